"""Fewer DiT evaluations (guidance schedule, caches), attention backends, compile and previews: exactness where
promised, each option reachable from the API, the CLI and the nodes."""

import logging

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from refalign_core.inference.acceleration import attention_backend, set_attention_backend
from refalign_core.inference.caching import CACHES
from refalign_core.errors import RefAlignInputError
from refalign_core.inference.sampler import SamplingSettings, sample_r2v, step_at_sigma
from tiny_models import TINY_DIT

TEXT = TINY_DIT["text_dim"]
SETTINGS = SamplingSettings(num_frames=5, height=32, width=48, steps=8, shift=3.0)


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 9, TEXT, generator=g), torch.randn(1, 5, TEXT, generator=g),
            torch.randn(1, 16, 2, 4, 6, generator=g))


def passes_run(dit):
    """Batch sizes of the DiT forwards, and how many blocks computed their self-attention."""
    calls, blocks = [], []
    handles = [dit.register_forward_pre_hook(lambda m, a, k: calls.append(a[0].shape[0]), with_kwargs=True)]
    handles += [b.attn1.to_q.register_forward_hook(lambda m, a, o: blocks.append(1)) for b in dit.blocks]
    return calls, blocks, handles


def test_text_kv_cache_is_exact_and_caches_off_is_the_default_run(dit):
    plain = sample_r2v(dit, *inputs(), SETTINGS)
    assert torch.equal(sample_r2v(dit, *inputs(), SETTINGS.replace(text_kv_cache=True)), plain)
    assert torch.equal(sample_r2v(dit, *inputs(), SETTINGS.replace(text_kv_cache=True), batch_passes=False),
                       sample_r2v(dit, *inputs(), SETTINGS, batch_passes=False))
    assert torch.equal(sample_r2v(dit, *inputs(), SETTINGS.replace(cache="none")), plain)
    assert all(not hasattr(b.attn2.processor, "text_kv") for b in dit.blocks)  # the run owned its caches
    assert getattr(dit, "_cache_config", None) is None  # hooks removed after the run


def test_guidance_steps_run_three_passes_then_the_prompt_pass(dit):
    calls, _, handles = passes_run(dit)
    out = sample_r2v(dit, *inputs(), SETTINGS.replace(guidance_steps=2))
    for h in handles:
        h.remove()
    assert calls == [3, 3] + [1] * 6
    assert torch.equal(sample_r2v(dit, *inputs(), SETTINGS.replace(guidance_steps=8)),
                       sample_r2v(dit, *inputs(), SETTINGS))
    assert not torch.allclose(out, sample_r2v(dit, *inputs(), SETTINGS))
    # one prompt pass on every step = plain conditional sampling with the references (text scale 1)
    single = sample_r2v(dit, *inputs(), SETTINGS.replace(guidance_steps=0))
    conditional = sample_r2v(dit, *inputs(), SETTINGS.replace(image_scale=1.0, text_scale=1.0))
    torch.testing.assert_close(single, conditional, rtol=1e-5, atol=1e-5)


def test_step_at_sigma_finds_the_step_of_a_sigma_on_and_between_the_grid():
    sigmas = torch.tensor([0.9, 0.7, 0.5, 0.3])
    assert [step_at_sigma(float(s), sigmas) for s in sigmas] == [0, 1, 2, 3]
    assert [step_at_sigma(s, sigmas) for s in (1.0, 0.85, 0.75, 0.31, 0.0)] == [0, 0, 1, 3, 3]


@pytest.mark.parametrize("changes,modes", [
    ({}, ["three_pass"] * 4),
    ({"guidance_steps": 2}, ["three_pass"] * 2 + ["prompt_only"] * 2),
    ({"image_guidance_start": 0.25, "image_guidance_end": 0.75}, ["no_image_pass", "three_pass", "three_pass",
                                                                  "no_image_pass"]),
    ({"image_guidance_end": 0.5, "guidance_steps": 3}, ["three_pass", "three_pass", "no_image_pass", "prompt_only"]),
    ({"image_guidance_start": 0.5, "image_guidance_end": 0.5}, ["no_image_pass"] * 4),
])
def test_the_step_schedule_of_guidance_steps_and_the_image_window(changes, modes):
    settings = SamplingSettings(steps=4, **changes)
    assert [settings.guidance_at(step) for step in range(4)] == modes


def test_the_image_window_skips_the_image_pass_outside_it_and_is_exact_at_full_range(dit):
    calls, _, handles = passes_run(dit)
    try:
        out = sample_r2v(dit, *inputs(), SETTINGS.replace(image_guidance_start=0.25, image_guidance_end=0.5))
    finally:
        for handle in handles:
            handle.remove()
    # steps 2 and 3 (2/8, 3/8) are in the window; the others batch u and c_txt
    assert calls == [2, 2, 3, 3, 2, 2, 2, 2]
    assert torch.equal(sample_r2v(dit, *inputs(), SETTINGS.replace(image_guidance_start=0.0, image_guidance_end=1.0)),
                       sample_r2v(dit, *inputs(), SETTINGS))
    assert not torch.allclose(out, sample_r2v(dit, *inputs(), SETTINGS))
    # outside the window the step is two-pass CFG between u and c_txt: with s_img = s_txt the formulas agree
    same = SETTINGS.replace(image_scale=SETTINGS.text_scale)
    torch.testing.assert_close(sample_r2v(dit, *inputs(), same.replace(image_guidance_end=0.0)),
                               sample_r2v(dit, *inputs(), same), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cache", [c for c in CACHES if c != "none"])
def test_each_cache_skips_work_per_pass_and_stays_close(dit, cache, caplog):
    reference = sample_r2v(dit, *inputs(), SETTINGS)
    calls, blocks, handles = passes_run(dit)
    knob = {"cache_interval": 2} if cache == "taylorseer" else {"cache_threshold": 0.5}
    with caplog.at_level(logging.WARNING):
        out = sample_r2v(dit, *inputs(), SETTINGS.replace(cache=cache, **knob))
    for h in handles:
        h.remove()
    calibration = 0
    if cache == "magcache":  # calibrates once on this model: one uncached run first
        assert "calibrating" in caplog.text
        calibration = 3 * SETTINGS.steps * len(dit.blocks)
    assert set(calls) == {1}  # one pass per forward, each in its own cache context
    assert len(blocks) - calibration < 3 * SETTINGS.steps * len(dit.blocks)  # some block work was skipped
    error = (out - reference).pow(2).mean().sqrt() / reference.std()
    assert 0 < error < 0.5
    assert getattr(dit, "_cache_config", None) is None
    again = sample_r2v(dit, *inputs(), SETTINGS.replace(cache=cache, **knob))
    assert torch.equal(again, out)  # fresh cache state every run, calibration kept


@pytest.mark.parametrize("bad, match", [
    (dict(guidance_steps=9), "guidance_steps"), (dict(guidance_steps=-1), "guidance_steps"),
    (dict(cache="teacache"), "cache"), (dict(cache_threshold=0.0), "cache_threshold"),
    (dict(cache_interval=0), "cache_interval"), (dict(text_kv_cache="yes"), "text_kv_cache"),
])
def test_bad_speed_settings_are_refused(bad, match):
    with pytest.raises(RefAlignInputError, match=match):
        SETTINGS.replace(**bad)


def test_attention_backend_falls_back_with_one_warning(dit, caplog):
    with caplog.at_level(logging.WARNING):
        assert set_attention_backend(dit, "sage") == "native"
    assert "sage" in caplog.text and "native" in caplog.text
    assert attention_backend(dit) == "native"
    with pytest.raises(RefAlignInputError, match="attention backend"):
        set_attention_backend(dit, "fastest")


def test_latent_preview_fits_the_vae_and_tracks_the_image():
    from refalign_core.toy.demo import embedded_bundle
    from refalign_core.inference.pipeline import VAECodec
    from refalign_core.inference.previews import LatentPreview, fit_latent_rgb, preview_image
    from refalign_core.models.vae import load_vae
    codec = VAECodec(load_vae(embedded_bundle() / "vae.safetensors"))  # the trained toy VAE
    weights = fit_latent_rgb(codec)
    red = torch.zeros(1, 3, 32, 32)
    red[:, 0] = 1.0
    blue = red.roll(2, dims=1)
    pixels = [torch.tensor(preview_image(codec.encode_references(im), weights, 0).getpixel((2, 2))) for im in
              (red, blue)]
    assert pixels[0][0] > pixels[0][2] and pixels[1][2] > pixels[1][0]
    seen = []
    LatentPreview(codec, lambda step, steps, image: seen.append((step, image.size)))(1, 4, torch.zeros(1, 16, 2, 4, 6))
    assert seen == [(1, (48, 32))]


def test_cli_reaches_every_speed_option(tmp_path, monkeypatch):
    from refalign_core import __main__ as cli
    from tiny_models import build_random_bundle
    from refalign_core.models.lora import LoraSpec
    bundle = build_random_bundle(tmp_path / "bundle")
    Image.new("RGB", (40, 30), (200, 30, 30)).save(tmp_path / "ref.png")
    for name in ("a", "b"):  # the CLI checks the files exist; applying them is stubbed below
        save_file({"x": torch.zeros(1)}, tmp_path / f"{name}.safetensors")
    seen = {}
    real_call = cli.RefAlignPipeline.__call__

    def spy(self, *args, settings=None, **kwargs):
        seen["settings"], seen["dit"] = settings, self.dit
        return real_call(self, *args, settings=settings, **kwargs)

    monkeypatch.setattr(cli.RefAlignPipeline, "__call__", spy)
    applied = []
    monkeypatch.setattr("refalign_core.inference.pipeline.apply_loras", lambda dit, loras: applied.extend(loras))
    monkeypatch.setattr("refalign_core.inference.pipeline.compile_blocks", lambda dit: applied.append("compiled"))
    code = cli.main(["generate", "--bundle", str(bundle), "--prompt", "x", "--ref", str(tmp_path / "ref.png"),
                     "--width", "32", "--height", "32", "--num-frames", "5", "--steps", "4", "--guidance-steps", "1",
                     "--cache", "first_block", "--cache-threshold", "0.2", "--text-kv-cache",
                     "--lora", f"{tmp_path / 'a.safetensors'}:0.5", "--lora", str(tmp_path / "b.safetensors"),
                     "--attention-backend", "flash",
                     "--compile", "--preview", str(tmp_path / "preview.png"),
                     "--save-latents", str(tmp_path / "l.safetensors")])
    assert code == 0
    s = seen["settings"]
    assert (s.guidance_steps, s.cache, s.cache_threshold, s.text_kv_cache) == (1, "first_block", 0.2, True)
    assert applied == [LoraSpec(str(tmp_path / "a.safetensors"), 0.5), LoraSpec(str(tmp_path / "b.safetensors"), 1.0),
                       "compiled"]
    assert attention_backend(seen["dit"]) == "native"  # flash needs CUDA: fell back
    assert Image.open(tmp_path / "preview.png").size == (32, 32)


def test_a_cancelled_magcache_calibration_is_not_kept(dit):
    from refalign_core.inference.sampler import SamplingCancelled
    calls, memo = [], {}
    with pytest.raises(SamplingCancelled):
        sample_r2v(dit, *inputs(), SETTINGS.replace(cache="magcache"),
                   cancel_check=lambda: calls.append(1) or len(calls) > 2, mag_ratio_memo=memo)
    assert memo == {}
    assert all(not b._forward_hooks and not b._forward_pre_hooks for b in dit.blocks)  # calibration hooks removed
