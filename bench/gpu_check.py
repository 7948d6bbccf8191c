"""GPU check at real size (for a session that is lent a GPU; see bench/gpu_check.sh): Wan2.1-1.3B shapes with
random weights, 480×832×81 (32 760 video tokens + one reference), bf16, 3 steps of three-pass guidance.

Rows: s/step, s/video at the row's steps and peak memory for each attention backend that is installed, with and
without a cache, fp8 weight storage, block swap (diffusers group offload), the turbo preset (what a distilled
student costs: its LoRA is fused, so it runs at the base model's speed) against the official 50 steps of three
passes, and diffusers' own `WanTransformer3DModel` forward on the same video tokens (three passes without the
reference tail) as the yardstick."""

import statistics
import sys
import time
from pathlib import Path

import torch
from diffusers import WanTransformer3DModel

from refalign_core.inference.acceleration import ATTENTION_BACKENDS, attention_backend_available, set_attention_backend
from refalign_core.models.checkpoint import apply_layerwise_casting
from refalign_core.inference.pipeline import DiTDenoiser, generate
from refalign_core.inference.sampler import PRESETS, SamplingSettings

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tiny random models
from tiny_models import tiny_dit  # noqa: E402

WAN_1_3B = dict(num_attention_heads=12, attention_head_dim=128, text_dim=4096, freq_dim=256, ffn_dim=8960,
                in_channels=16, out_channels=16, num_layers=30)
SETTINGS = SamplingSettings(width=832, height=480, num_frames=81, steps=3, shift=5.0)
DEVICE = torch.device("cuda")


def inputs():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(1, 512, 4096, generator=g), torch.randn(1, 512, 4096, generator=g),
            torch.randn(1, 16, 1, 60, 104, generator=g))


def timed(run, steps: int = SETTINGS.steps) -> tuple[float, float]:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    run()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps, torch.cuda.max_memory_allocated() / 2**30


def dit(storage=torch.bfloat16, block_swap=False):
    model = tiny_dit(0, **WAN_1_3B)
    if storage == torch.float8_e4m3fn:
        model.to(torch.bfloat16)
        apply_layerwise_casting(model, storage, torch.bfloat16)
    else:
        model.to(storage)
    if block_swap:
        model.enable_group_offload(onload_device=DEVICE, offload_device=torch.device("cpu"),
                                   offload_type="block_level", num_blocks_per_group=1, use_stream=True)
    else:
        model.to(DEVICE)
    return model


def row(name, model, **options):
    prompt, negative, references = inputs()
    settings = SETTINGS.replace(**options)
    def sample(settings):
        return generate(DiTDenoiser(model), None, (prompt, negative), settings, reference_latents=references)

    sample(settings.replace(steps=1))  # warm-up
    step, peak = timed(lambda: sample(settings), settings.steps)
    print(f"{name:40s} {step:8.2f} s/step {step * settings.steps:8.2f} s/video at {settings.steps} steps "
          f"{peak:7.1f} GiB", flush=True)
    return step


def main():
    print(torch.cuda.get_device_name(), torch.__version__)
    model, three_pass = dit(), {}
    for backend in ATTENTION_BACKENDS:
        ok, why = attention_backend_available(backend, DEVICE)
        if not ok:
            print(f"{backend:40s} skipped: {why}")
            continue
        set_attention_backend(model, backend)
        three_pass[backend] = row(f"{backend}", model)
        row(f"{backend} + text_kv_cache", model, text_kv_cache=True)
        row(f"{backend} + first_block 0.05", model, cache="first_block")
        row(f"{backend} + taylorseer every 3", model, cache="taylorseer", cache_interval=3)
    set_attention_backend(model, "native")
    turbo = row("native, turbo preset (one pass)", model, **PRESETS["turbo"])
    speedup = 50 * three_pass["native"] / (turbo * PRESETS["turbo"]["steps"])
    print(f"{'turbo vs 50 three-pass steps (native)':40s} {speedup:8.1f}× faster denoising", flush=True)
    del model
    torch.cuda.empty_cache()
    row("native, fp8 storage", dit(torch.float8_e4m3fn))
    torch.cuda.empty_cache()
    row("native, block swap", dit(block_swap=True))
    torch.cuda.empty_cache()

    plain = WanTransformer3DModel(**{k: v for k, v in WAN_1_3B.items()}).to(DEVICE, torch.bfloat16).eval()
    x = torch.randn(3, 16, 21, 60, 104, device=DEVICE, dtype=torch.bfloat16)
    text = torch.randn(3, 512, 4096, device=DEVICE, dtype=torch.bfloat16)
    t = torch.full((3,), 700.0, device=DEVICE)
    with torch.no_grad():
        plain(x, t, text)
        times = []
        for _ in range(SETTINGS.steps):
            step, peak = timed(lambda: plain(x, t, text))
            times.append(step * SETTINGS.steps)
    print(f"{'diffusers WanTransformer3DModel (no refs)':40s} {statistics.median(times):8.2f} s/step {peak:7.1f} GiB")


if __name__ == "__main__":
    with torch.no_grad():
        main()
