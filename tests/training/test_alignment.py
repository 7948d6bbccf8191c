import math

import pytest
import torch

from refalign_core.training.alignment import (AlignmentProjectors, default_aligned_blocks, flow_matching_sample,
                                              fm_loss, ra_gate, ra_loss, ra_loss_per_sample, training_sigmas,
                                              timestep_weights)


class FixedProjector(torch.nn.Module):
    def forward(self, x):
        return x


class Identity(AlignmentProjectors):
    """Projectors that pass features through, so cosines are set by hand."""

    def __init__(self, blocks):
        super().__init__(4, 2, blocks)

    def __getitem__(self, block):
        return FixedProjector()


def unit(deg):
    return torch.tensor([math.cos(math.radians(deg)), math.sin(math.radians(deg))])


def test_projector_shapes_and_official_key_names():
    p = AlignmentProjectors(1536, 1024, range(9))
    sd = p.state_dict()
    assert sd["blocks.0.input_mlp.proj.0.weight"].shape == (768, 1536)
    assert sd["blocks.8.input_mlp.proj.2.weight"].shape == (1024, 768)
    assert len(sd) == 18 and not any("bias" in k for k in sd)
    assert isinstance(p[3][1], torch.nn.SiLU)
    assert default_aligned_blocks(30) == list(range(9)) == default_aligned_blocks(40)
    assert default_aligned_blocks(6) == [0, 1]


def test_single_reference_has_only_the_positive_term():
    # two tokens: cosines with their own teacher token 1 and 0 -> pos = mean(1-1, 1-0) = 0.5
    h = torch.stack([unit(0), unit(90)])[None]
    f = torch.stack([unit(0), unit(0)])[None]
    loss = ra_loss({0: h}, f, Identity([0]), references=1)
    assert loss.positive.item() == pytest.approx(0.5)
    assert loss.negative.item() == 0 and loss.total.item() == pytest.approx(0.5)


def test_two_references_with_known_cosines():
    # tokens 0,1 = subject A, tokens 2,3 = subject B (T = 2)
    h = torch.stack([unit(0), unit(60), unit(90), unit(180)])[None]
    f = torch.stack([unit(0), unit(0), unit(90), unit(90)])[None]
    loss = ra_loss({0: h, 1: h}, f, Identity([0, 1]), references=2)
    pos = ((1 - 1) + (1 - 0.5) + (1 - 1) + (1 - 0)) / 4  # c_ii = 1, 0.5, 1, 0
    # cross pairs (i in A, j in B) and (i in B, j in A): relu(cos)
    cross = [max(0, torch.dot(h[0, i], f[0, j]).item()) for i, j in
             [(0, 2), (0, 3), (1, 2), (1, 3), (2, 0), (2, 1), (3, 0), (3, 1)]]
    neg = sum(cross) / 8  # = (0+0+sin60+sin60+0+0+0+0)/8
    assert neg == pytest.approx(2 * math.sin(math.radians(60)) / 8, abs=1e-6)
    assert loss.positive.item() == pytest.approx(pos, abs=1e-6)
    assert loss.negative.item() == pytest.approx(neg, abs=1e-6)
    assert loss.total.item() == pytest.approx(pos + neg, abs=1e-6)
    margins = ra_loss({0: h}, f, Identity([0]), 2, pos_margin=0.4, neg_margin=0.5, neg_weight=2.0)
    assert margins.positive.item() == pytest.approx((0.1 + 0.6) / 4, abs=1e-6)
    # relu(0.5 - (1 - c)) = relu(c - 0.5): only sin60 - 0.5 twice, weighted by 2
    assert margins.negative.item() == pytest.approx(2 * 2 * (math.sin(math.radians(60)) - 0.5) / 8, abs=1e-6)


def test_gate_and_dropped_references():
    h = torch.stack([unit(0), unit(90)])[None].repeat(2, 1, 1)
    f = torch.stack([unit(90), unit(0)])[None].repeat(2, 1, 1)
    loss = ra_loss({0: h}, f, Identity([0]), 1, keep=torch.tensor([1.0, 0.0]), gate=ra_gate(torch.tensor([500.0, 900.0])))
    assert loss.positive.item() == pytest.approx(1.0)  # logged over kept samples only
    assert loss.total.item() == pytest.approx((0.125 * 1.0 + 0.0) / 2)
    assert ra_gate(torch.tensor([1000.0, 0.0])).tolist() == [1.0, 0.0]


def test_flow_matching_grid_weights_and_sample():
    sigmas = training_sigmas(5.0)
    assert sigmas[0] == 1 and sigmas[500].item() == pytest.approx(5 * 0.5 / 3)
    w = timestep_weights(sigmas * 1000)
    assert w.mean().item() == pytest.approx(1.0) and w.max().item() == pytest.approx(2.08, abs=0.01)
    assert ra_gate(sigmas * 1000).mean().item() == pytest.approx(0.53, abs=0.01)
    x0 = torch.randn(3, 16, 2, 4, 4)
    s = flow_matching_sample(x0, torch.Generator().manual_seed(0))
    sigma = (s.timesteps / 1000).view(-1, 1, 1, 1, 1)
    noise = s.target + x0
    torch.testing.assert_close(s.noisy, (1 - sigma) * x0 + sigma * noise)
    assert fm_loss(s.target, s).item() == 0
    expected = (s.weights * (s.target + 1 - s.target).square().flatten(1).mean(1)).mean()
    assert fm_loss(s.target + 1, s).item() == pytest.approx(expected.item())


def test_gradients_reach_dit_and_projectors_never_the_vfm(dit):
    from refalign_core.models.vfm import EfficientNetLite0VFM, EfficientNetLite0
    vfm = EfficientNetLite0VFM(EfficientNetLite0().eval().requires_grad_(False))
    images = torch.rand(2, 3, 32, 48)
    tokens = vfm(images).flatten(0, 1)[None]  # [1, 2*T, 1392]
    projectors = AlignmentProjectors(32, vfm.dim, [0, 1])
    x, refs = torch.randn(1, 16, 2, 4, 6), torch.randn(1, 16, 2, 4, 6)
    out = dit(x, torch.tensor([900.0]), torch.randn(1, 5, 32), reference_latents=refs, reference_feature_blocks=[0, 1])
    loss = ra_loss(out.reference_features, tokens, projectors, 2)
    loss.total.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in projectors.parameters())
    assert dit.blocks[0].attn1.to_q.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in vfm.parameters()) and not tokens.requires_grad


def test_a_padded_batch_gives_each_sample_its_unpadded_loss():
    torch.manual_seed(0)
    projectors = AlignmentProjectors(8, 6, [0, 1])
    t = 4  # tokens per reference
    three = {b: torch.randn(1, 3 * t, 8) for b in (0, 1)}, torch.randn(1, 3 * t, 6)
    two = {b: torch.randn(1, 2 * t, 8) for b in (0, 1)}, torch.randn(1, 2 * t, 6)
    one = {b: torch.randn(1, t, 8) for b in (0, 1)}, torch.randn(1, t, 6)
    pad = lambda x, n: torch.nn.functional.pad(x, (0, 0, 0, n - x.shape[1]), value=7.0)  # noqa: E731 (junk padding)
    features = {b: torch.cat([three[0][b], pad(two[0][b], 3 * t), pad(one[0][b], 3 * t)]) for b in (0, 1)}
    tokens = torch.cat([three[1], pad(two[1], 3 * t), pad(one[1], 3 * t)])
    mask = torch.tensor([[True, True, True], [True, True, False], [True, False, False]])
    pos, neg = ra_loss_per_sample(features, tokens, projectors, mask)
    for i, (f, v, k) in enumerate((three + (3,), two + (2,), one + (1,))):
        p1, n1 = ra_loss_per_sample(f, v, projectors, k)
        torch.testing.assert_close(pos[i:i + 1], p1)
        torch.testing.assert_close(neg[i:i + 1], n1)
    assert neg[2] == 0 and neg[1] > 0
    unmasked, _ = ra_loss_per_sample(features, tokens, projectors, 3)
    assert not torch.allclose(unmasked[1], pos[1])  # the padding would count without the mask
