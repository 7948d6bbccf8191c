import numpy as np
import pytest
import torch

from refalign_core.errors import RefAlignInputError
from refalign_core.inference.sampler import (SamplingCancelled, SamplingSettings, guidance_weights, make_scheduler,
                                             sample_r2v, three_pass_guidance)
from tiny_models import TINY_DIT

TEXT = TINY_DIT["text_dim"]


def inputs(k=2, h=32, w=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 9, TEXT, generator=g), torch.randn(1, 5, TEXT, generator=g),
            torch.randn(1, 16, k, h // 8, w // 8, generator=g))


SMALL = SamplingSettings(num_frames=5, height=32, width=48, steps=3)


def test_euler_schedule_is_the_official_shifted_grid():
    scheduler = make_scheduler("euler", 50, 5.0)
    u = 1 - np.arange(50) / 50
    expected = 5 * u / (1 + 4 * u)
    np.testing.assert_allclose(scheduler.sigmas[:-1].numpy(), expected, rtol=1e-6)
    assert scheduler.sigmas[-1] == 0
    np.testing.assert_allclose(scheduler.timesteps.numpy(), 1000 * expected, rtol=1e-5)


def test_same_seed_same_video_other_seed_other_video(dit):
    a = sample_r2v(dit, *inputs(), SMALL.replace(seed=3))
    b = sample_r2v(dit, *inputs(), SMALL.replace(seed=3))
    c = sample_r2v(dit, *inputs(), SMALL.replace(seed=4))
    assert a.shape == (1, 16, 2, 4, 6)
    assert torch.equal(a, b) and not torch.allclose(a, c)


def count_forwards(dit):
    calls = []
    hook = dit.register_forward_pre_hook(lambda m, args, kwargs: calls.append(args[0].shape[0]), with_kwargs=True)
    return calls, hook


def test_batched_passes_equal_sequential_passes_in_one_forward_per_step(dit):
    calls, hook = count_forwards(dit)
    batched = sample_r2v(dit, *inputs(), SMALL, batch_passes=True)
    n_batched = list(calls)
    calls.clear()
    sequential = sample_r2v(dit, *inputs(), SMALL, batch_passes=False)
    hook.remove()
    assert n_batched == [3, 3, 3] and calls == [1] * 9
    torch.testing.assert_close(batched, sequential, rtol=1e-4, atol=1e-5)


def test_guidance_follows_the_three_pass_formula(dit):
    """One Euler step from the same noise equals x + (σ1−σ0)·v with v built from three separate forwards."""
    prompt, negative, refs = inputs()
    negative = torch.nn.functional.pad(negative, (0, 0, 0, 4))  # the sampler zero-pads both to one length
    out = sample_r2v(dit, prompt, negative, refs, SMALL.replace(image_scale=2.0, text_scale=3.0, seed=7, steps=1))
    noise = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    t = torch.tensor([1000.0])
    with torch.no_grad():
        u = dit(noise, t, negative, reference_latents=torch.zeros_like(refs)).sample
        ci = dit(noise, t, negative, reference_latents=refs).sample
        ct = dit(noise, t, prompt, reference_latents=refs).sample
    expected = noise + (0.0 - 1.0) * three_pass_guidance(u, ci, ct, 2.0, 3.0)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


def test_passes_with_zero_weight_are_skipped(dit):
    calls, hook = count_forwards(dit)
    sample_r2v(dit, *inputs(), SMALL.replace(image_scale=1.0, text_scale=7.5))  # u has weight 0
    two = list(calls)
    calls.clear()
    sample_r2v(dit, *inputs(), SMALL.replace(image_scale=1.0, text_scale=1.0))  # only c_txt
    hook.remove()
    assert two == [2, 2, 2] and calls == [1, 1, 1]


def test_one_zero_frame_unconditional_option(dit):
    calls, hook = count_forwards(dit)
    shapes = []
    h2 = dit.register_forward_pre_hook(lambda m, a, kw: shapes.append(kw["reference_latents"].shape[2]), with_kwargs=True)
    a = sample_r2v(dit, *inputs(k=2), SMALL.replace(uncond_references="one_zero_frame"))
    hook.remove(), h2.remove()
    assert sorted(set(shapes)) == [1, 2]
    b = sample_r2v(dit, *inputs(k=2), SMALL)
    assert not torch.allclose(a, b)


def test_callback_every_step_and_cancel(dit):
    seen = []
    sample_r2v(dit, *inputs(), SMALL, callback=lambda i, n, x: seen.append((i, n, tuple(x.shape))))
    assert [s[:2] for s in seen] == [(1, 3), (2, 3), (3, 3)]
    checks = []
    with pytest.raises(SamplingCancelled):
        sample_r2v(dit, *inputs(), SMALL, cancel_check=lambda: checks.append(1) or len(checks) > 1)
    assert len(checks) == 2


def test_unipc_runs_and_differs_from_euler(dit):
    a = sample_r2v(dit, *inputs(), SMALL.replace(sampler="unipc"))
    b = sample_r2v(dit, *inputs(), SMALL.replace(sampler="euler"))
    assert torch.isfinite(a).all() and not torch.allclose(a, b)


@pytest.mark.parametrize("bad,match", [
    (dict(num_frames=6), "4n\\+1"), (dict(height=40), "multiples of 16"), (dict(sampler="ddim"), "sampler"),
    (dict(uncond_references="none"), "uncond_references"), (dict(shift=float("nan")), "shift"),
    (dict(shift=0.0), "shift"), (dict(steps=0), "steps"), (dict(width=0), "multiples of 16"),
    (dict(seed=2**64), "seed"), (dict(seed=-1), "seed"), (dict(steps=2.5), "steps"), (dict(steps=True), "steps"),
    (dict(text_scale=float("inf")), "text_scale"), (dict(guidance=3.0), "unknown setting"),
])
def test_bad_settings_are_refused(bad, match):
    with pytest.raises(RefAlignInputError, match=match):
        SMALL.replace(**bad)


def test_mismatched_reference_latents_are_refused(dit):
    prompt, negative, _ = inputs()
    with pytest.raises(RefAlignInputError, match="reference latents"):
        sample_r2v(dit, prompt, negative, torch.zeros(1, 16, 2, 8, 8), SMALL)


def test_settings_are_validated_once_and_read_from_dicts():
    settings = SamplingSettings.from_dict({"width": 64, "height": 64, "num_frames": 17, "shift": 1})
    assert settings.shift == 1.0 and isinstance(settings.shift, float) and settings.steps == 50
    assert settings.latent_shape() == (1, 16, 5, 8, 8)
    assert SamplingSettings.from_dict(settings.to_dict()) == settings
    with pytest.raises(RefAlignInputError, match="bundle x: unknown setting"):
        SamplingSettings.from_dict({"fps": 8}, source="bundle x")


def test_guidance_weights_reproduce_the_formula():
    u, ci, ct = torch.randn(3, 4)
    w = guidance_weights(5.0, 7.5)
    torch.testing.assert_close(w[0] * u + w[1] * ci + w[2] * ct, three_pass_guidance(u, ci, ct, 5.0, 7.5))


def test_reference_strength_zero_ignores_what_the_references_show(dit):
    """At strength 0 no pass attends to the references: two different reference sets give the same video, which
    strength 1 (the default, bit for bit) does not."""
    prompt, negative, refs = inputs()
    other = torch.randn_like(refs)
    zero = SMALL.replace(reference_strength=0.0)
    torch.testing.assert_close(sample_r2v(dit, prompt, negative, refs, zero),
                               sample_r2v(dit, prompt, negative, other, zero), rtol=0, atol=1e-5)
    assert torch.equal(sample_r2v(dit, prompt, negative, refs, SMALL.replace(reference_strength=1.0)),
                       sample_r2v(dit, prompt, negative, refs, SMALL))
    assert not torch.allclose(sample_r2v(dit, prompt, negative, refs, SMALL),
                              sample_r2v(dit, prompt, negative, other, SMALL), atol=1e-3)
    for bad in (-0.5, 2.5, float("nan")):
        with pytest.raises(RefAlignInputError, match="reference_strength"):
            SMALL.replace(reference_strength=bad)
