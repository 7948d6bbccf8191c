import pytest
import torch
from diffusers import WanTransformer3DModel

from tiny_models import TINY_DIT
from refalign_core.models.transformer_refalign import VideoOnlyCrossAttnProcessor

from helpers import video_inputs


def plain_wan(dit):
    plain = WanTransformer3DModel(**TINY_DIT).eval()
    plain.load_state_dict(dit.state_dict())
    return plain


@torch.no_grad()
def test_no_references_equals_plain_wan_bit_for_bit(dit):
    x, t, text, _ = video_inputs(batch=2)
    expected = plain_wan(dit)(x, t, text).sample
    assert torch.equal(dit(x, t, text).sample, expected)
    empty = torch.zeros(2, 16, 0, x.shape[3], x.shape[4])
    assert torch.equal(dit(x, t, text, reference_latents=empty).sample, expected)


@torch.no_grad()
def test_references_keep_video_output_shape_and_change_it(dit):
    x, t, text, refs = video_inputs()
    for k in (1, 2):
        out = dit(x, t, text, reference_latents=refs[:, :, :k]).sample
        assert out.shape == x.shape
    assert not torch.allclose(dit(x, t, text, reference_latents=refs).sample, dit(x, t, text).sample)


@torch.no_grad()
def test_without_cross_attention_output_equals_plain_wan_on_concatenated_frames(dit):
    """With the cross-attention output projection zeroed, the reference branch is exactly plain Wan on F+K frames
    cropped to F: same token order, RoPE, shared modulation."""
    for block in dit.blocks:
        block.attn2.to_out[0].weight.zero_()
        block.attn2.to_out[0].bias.zero_()
    x, t, text, refs = video_inputs()
    ours = dit(x, t, text, reference_latents=refs).sample
    plain = plain_wan(dit)(torch.cat([x, refs], dim=2), t, text).sample[:, :, : x.shape[2]]
    torch.testing.assert_close(ours, plain, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_block0_reference_features_ignore_text_but_video_depends_on_it(dit):
    x, t, text, refs = video_inputs()
    other_text = text + torch.randn_like(text)
    captured = []
    hook = dit.blocks[0].register_forward_hook(lambda m, a, out: captured.append(out))
    a = dit(x, t, text, reference_latents=refs, reference_feature_blocks=[0, 2])
    b = dit(x, t, other_text, reference_latents=refs, reference_feature_blocks=[0, 2])
    hook.remove()
    assert set(a.reference_features) == {0, 2}
    n_video = x.shape[2] * (x.shape[3] // 2) * (x.shape[4] // 2)
    assert a.reference_features[0].shape == (1, 2 * (x.shape[3] // 2) * (x.shape[4] // 2), TINY_DIT["attention_head_dim"] * 2)
    assert torch.equal(a.reference_features[0], b.reference_features[0])
    assert torch.equal(a.reference_features[0], captured[0][:, n_video:])
    assert not torch.allclose(captured[0][:, :n_video], captured[1][:, :n_video])
    # from block 1 on, self-attention mixes text-conditioned video tokens into the references
    assert not torch.allclose(a.reference_features[2], b.reference_features[2])


@torch.no_grad()
def test_reference_rope_positions_continue_after_the_video(dit):
    x, t, text, refs = video_inputs(frames=3, height=8, width=12)
    captured = {}
    hook = dit.blocks[0].register_forward_pre_hook(lambda m, args: captured.update(rope=args[3]))
    dit(x, t, text, reference_latents=refs)
    hook.remove()
    cos = captured["rope"][0][0, :, 0]  # [L, head_dim]
    rope = dit.rope
    t_dim, h_dim = rope.t_dim, rope.h_dim
    table_t = rope.freqs_cos[:, :t_dim].float()
    table_h = rope.freqs_cos[:, t_dim : t_dim + h_dim].float()
    positions_t = torch.cdist(cos[:, :t_dim].float(), table_t).argmin(dim=1)
    positions_h = torch.cdist(cos[:, t_dim : t_dim + h_dim].float(), table_h).argmin(dim=1)
    frames, hp, wp = 3, 4, 6
    per_frame = hp * wp
    assert cos.shape[0] == (frames + 2) * per_frame
    ref_t = positions_t[frames * per_frame :].view(2, per_frame)
    assert ref_t[0].eq(frames).all() and ref_t[1].eq(frames + 1).all()
    ref_h = positions_h[frames * per_frame :].view(2, hp, wp)
    assert torch.equal(ref_h[1, :, 0], torch.arange(hp))  # the spatial grid restarts at 0


def test_cross_attention_processor_is_installed_and_skips_references(dit):
    assert all(isinstance(b.attn2.processor, VideoOnlyCrossAttnProcessor) for b in dit.blocks)
    x, t, text, refs = video_inputs()
    updates = []
    hook = dit.blocks[1].attn2.register_forward_hook(lambda m, a, out: updates.append(out))
    with torch.no_grad():
        dit(x, t, text, reference_latents=refs)
    hook.remove()
    n_video = x.shape[2] * 4 * 6
    assert updates[0][:, n_video:].abs().max() == 0
    assert updates[0][:, :n_video].abs().max() > 0


def test_reference_features_carry_gradients_with_checkpointing(dit):
    x, t, text, refs = video_inputs()

    def grads(checkpointing):
        dit.zero_grad()
        if checkpointing:
            dit.enable_gradient_checkpointing()
        else:
            dit.disable_gradient_checkpointing()
        out = dit(x, t, text, reference_latents=refs, reference_feature_blocks=[0, 1])
        loss = out.sample.square().mean() + sum(f.square().mean() for f in out.reference_features.values())
        loss.backward()
        return [p.grad.clone() for p in dit.parameters()]

    plain, checkpointed = grads(False), grads(True)
    assert all(g.abs().sum() > 0 for g in plain[:3])
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_padded_reference_batch_equals_each_sample_alone(dit):
    """Training batches pad samples to the largest reference count; the mask hides the padding from attention."""
    x, t, text, refs = video_inputs(batch=2)
    refs = torch.cat([refs, torch.randn_like(refs[:, :, :1])], dim=2)  # sample 0: 3 references
    refs[1, :, 1:] = 5.0  # sample 1: 1 reference + junk padding
    mask = torch.tensor([[True, True, True], [True, False, False]])
    with torch.no_grad():
        batch = dit(x, t, text, reference_latents=refs, reference_mask=mask, reference_feature_blocks=[0, 2])
        alone = [dit(x[i:i + 1], t[i:i + 1], text[i:i + 1], reference_latents=refs[i:i + 1, :, :k],
                     reference_feature_blocks=[0, 2]) for i, k in ((0, 3), (1, 1))]
        unmasked = dit(x, t, text, reference_latents=refs)
    for i, out in enumerate(alone):
        torch.testing.assert_close(batch.sample[i:i + 1], out.sample, rtol=1e-5, atol=1e-5)
        n = out.reference_features[2].shape[1]
        torch.testing.assert_close(batch.reference_features[2][i:i + 1, :n], out.reference_features[2],
                                   rtol=1e-5, atol=1e-5)
    assert not torch.allclose(unmasked.sample[1:], alone[1].sample, atol=1e-3)
    with torch.no_grad():  # an all-True mask is the unmasked forward, bit for bit
        same = dit(x, t, text, reference_latents=refs, reference_mask=torch.ones(2, 3, dtype=torch.bool))
    assert torch.equal(same.sample, unmasked.sample)
    with pytest.raises(ValueError, match="reference_mask"):
        dit(x, t, text, reference_latents=refs, reference_mask=mask[:, :2])


def test_bad_reference_shape_is_refused(dit):
    x, t, text, refs = video_inputs()
    try:
        dit(x, t, text, reference_latents=refs[:, :, :, :4])
    except ValueError as e:
        assert "reference_latents" in str(e)
    else:
        raise AssertionError("a reference of another spatial size must be refused")


def test_replacing_the_cross_attention_processor_is_refused(dit):
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor
    dit.blocks[1].attn2.set_processor(WanAttnProcessor())
    x, t, text, refs = video_inputs()
    try:
        dit(x, t, text, reference_latents=refs)
    except RuntimeError as e:
        assert "VideoOnlyCrossAttnProcessor" in str(e)
    else:
        raise AssertionError("a plain processor would let references cross-attend to the text")


@pytest.mark.parametrize("name", ["WanTransformer3DModel.forward", "WanTransformerBlock.forward"])
def test_parent_source_is_the_reviewed_one(name):
    """Our model and block forwards are adapted from diffusers'; a diffusers upgrade that changes either must be
    reviewed (port the change, then update PARENT_SOURCE_SHA256)."""
    import hashlib
    import inspect

    from diffusers.models.transformers import transformer_wan
    from refalign_core.models.transformer_refalign import PARENT_SOURCE_SHA256
    owner, method = name.split(".")
    source = inspect.getsource(getattr(getattr(transformer_wan, owner), method))
    assert hashlib.sha256(source.encode()).hexdigest() == PARENT_SOURCE_SHA256[name], \
        f"diffusers' {name} changed: review it against ours in transformer_refalign.py"


def test_there_is_no_context_parallel_plan(dit):
    assert type(dit)._cp_plan is None and WanTransformer3DModel._cp_plan is not None


@torch.no_grad()
def test_text_kv_cache_is_bit_identical_and_owned_by_the_caller(dit):
    from refalign_core.models.transformer_refalign import TextKVCache
    x, t, text, refs = video_inputs()
    uncached = dit(x, t, text, reference_latents=refs).sample
    cond, uncond = TextKVCache(), TextKVCache()
    first = dit(x, t, text, reference_latents=refs, text_kv=cond).sample
    calls = []
    hook = dit.blocks[0].attn2.to_k.register_forward_hook(lambda *a: calls.append(1))
    second = dit(x * 0.5, t * 0.5, text, reference_latents=refs, text_kv=cond).sample
    other = dit(x, t, text * 2, reference_latents=refs, text_kv=uncond).sample
    hook.remove()
    assert calls == [1]  # the filled cache was reused, the empty one filled once
    assert torch.equal(first, uncached)
    assert torch.equal(second, dit(x * 0.5, t * 0.5, text, reference_latents=refs).sample)
    assert torch.equal(other, dit(x, t, text * 2, reference_latents=refs).sample)
    assert set(cond.blocks) == set(range(len(dit.blocks)))
    fresh = vars(VideoOnlyCrossAttnProcessor())
    assert all(vars(b.attn2.processor) == fresh for b in dit.blocks)  # nothing of a call stays on the processors


def test_reference_strength_scales_attention_to_the_references(dit):
    """1 is the plain forward bit for bit (no bias is built); 0 hides the references, so the video tokens get what
    they get without them; in between and above, the output moves with the strength; padding stays hidden."""
    x, t, text, refs = video_inputs()
    with torch.no_grad():
        plain = dit(x, t, text, reference_latents=refs).sample
        none = dit(x, t, text).sample
        out = {s: dit(x, t, text, reference_latents=refs, reference_strength=s).sample for s in (0.0, 0.5, 1.0, 2.0)}
    assert torch.equal(out[1.0], plain)
    torch.testing.assert_close(out[0.0], none, rtol=0, atol=1e-5)
    distance = {s: (out[s] - none).abs().mean().item() for s in (0.5, 1.0, 2.0)}
    assert distance[0.5] < distance[1.0] < distance[2.0], distance  # further from "no references" as it rises
    x2, t2, text2, refs2 = video_inputs(batch=2)
    refs2 = torch.cat([refs2, torch.full_like(refs2[:, :, :1], 5.0)], dim=2)  # sample 1's third frame is padding
    mask = torch.tensor([[True, True, True], [True, True, False]])
    with torch.no_grad():
        padded = dit(x2, t2, text2, reference_latents=refs2, reference_mask=mask, reference_strength=0.5).sample
        alone = dit(x2[1:], t2[1:], text2[1:], reference_latents=refs2[1:, :, :2], reference_strength=0.5).sample
    torch.testing.assert_close(padded[1:], alone, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="reference_strength"):
        dit(x, t, text, reference_latents=refs, reference_strength=-1.0)
