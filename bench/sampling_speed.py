"""Fewer DiT evaluations: each speed feature against the default sampling of the same seed, CPU fp32, one process,
runs interleaved, medians.

    python bench/sampling_speed.py [--runs N] [--wan-blocks B] [--skip-wan]

Columns: DiT evaluations per video (guidance passes × the fraction of blocks that computed; a cache that skips
the tail counts its first block only), wall-time speedup vs the default, latent RMSE vs the default output (÷ the
default's latent std), and on the shipped toy model the Identity Check overall score and its change.
Configs: the shipped toy model (its defaults: 25 Euler steps, 128×128×9; its image and text scales are equal, so
two passes), and Wan2.1-1.3B shapes (random weights, 9×240×416, one reference, 512 text tokens, 4 steps) with
`--wan-blocks` of its 30 blocks (the ratios are per block; identity is meaningless on random weights).
MagCache is calibrated on the model during the warm-up (one uncached run), not timed.
Last line: `ratio: <best toy wall-time speedup at ≤ 0.02 identity loss>`."""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from refalign_core.toy.demo import DEMO_NAMES, DEMO_PROMPT, demo_references, embedded_bundle
from refalign_core.metrics.identity import IdentitySettings, check_identity
from refalign_core.inference.pipeline import DiTDenoiser, RefAlignPipeline, generate
from refalign_core.inference.sampler import SamplingSettings
from refalign_core.models.vfm import load_vfm

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tiny random models
from tiny_models import tiny_dit  # noqa: E402

TOY_FEATURES = {
    "default": {},
    "text_kv_cache (exact)": dict(text_kv_cache=True),
    "first_block 0.05": dict(cache="first_block"),
    "first_block 0.10": dict(cache="first_block", cache_threshold=0.10),
    "magcache 0.06": dict(cache="magcache"),
    "magcache 0.20": dict(cache="magcache", cache_threshold=0.20),
    "taylorseer every 3": dict(cache="taylorseer", cache_interval=3),
    "guidance_steps 5 of 25": dict(guidance_steps=5),
    "unipc 8 steps": dict(sampler="unipc", steps=8),
    "unipc 8 steps, guidance_steps 2": dict(sampler="unipc", steps=8, guidance_steps=2),
    "unipc 6 steps, guidance_steps 2, text_kv": dict(sampler="unipc", steps=6, guidance_steps=2, text_kv_cache=True),
}
WAN_FEATURES = {
    "default": {},
    "text_kv_cache (exact)": dict(text_kv_cache=True),
    "first_block 0.05": dict(cache="first_block"),
    "taylorseer every 2": dict(cache="taylorseer", cache_interval=2),
    "guidance_steps 1 of 4": dict(guidance_steps=1),
}
WAN_1_3B = dict(num_attention_heads=12, attention_head_dim=128, text_dim=4096, freq_dim=256, ffn_dim=8960,
                in_channels=16, out_channels=16)


class EvaluationCounter:
    """Counts guidance-pass evaluations of each block's self-attention (batched passes count per sample)."""

    def __init__(self, dit):
        self.blocks, self.count = len(dit.blocks), 0
        self.handles = [b.attn1.to_q.register_forward_hook(self._hook) for b in dit.blocks]

    def _hook(self, module, args, output):
        self.count += args[0].shape[0]

    def take(self) -> float:
        value, self.count = self.count / self.blocks, 0
        return value


def run_features(features: dict, sample, runs: int):
    """Interleaved runs; returns {name: (latents, [seconds], evaluations of a timed run)}."""
    results = {}
    for name, options in features.items():  # warm-up (and MagCache calibration)
        latents, _ = sample(options)
        results[name] = (latents, [], None)
    for _ in range(runs):
        for name, options in features.items():
            start = time.perf_counter()
            _, evaluations = sample(options)
            latents, times, _ = results[name]
            times.append(time.perf_counter() - start)
            results[name] = (latents, times, evaluations)
    return results


def report(title: str, results: dict, identity: dict | None = None) -> float:
    base_latents, base_times, base_evals = results["default"]
    base_wall, std = statistics.median(base_times), base_latents.std().item()
    print(f"\n{title}")
    header = f"{'feature':44s} {'DiT evals':>9s} {'÷ fewer':>8s} {'wall s':>7s} {'speedup':>8s} {'rel RMSE':>9s}"
    print(header + ("  identity  Δ" if identity else ""))
    best = 1.0
    for name, (latents, times, evals) in results.items():
        wall = statistics.median(times)
        rmse = (latents - base_latents).pow(2).mean().sqrt().item() / std if latents.shape == base_latents.shape \
            else float("nan")
        line = (f"{name:44s} {evals:9.1f} {base_evals / evals:8.2f} {wall:7.2f} {base_wall / wall:8.2f} "
                f"{rmse:9.4f}")
        if identity:
            delta = identity[name] - identity["default"]
            line += f"  {identity[name]:.3f} {delta:+.3f}"
            if delta >= -0.02:
                best = max(best, base_wall / wall)
        print(line)
    return best


def toy(runs: int) -> float:
    pipe = RefAlignPipeline.from_bundle(embedded_bundle())
    references, vfm = demo_references(), load_vfm()
    counter = EvaluationCounter(pipe.dit)
    frames = {}

    def sample(options):
        result = pipe(DEMO_PROMPT, references, negative_prompt="", seed=0, **options)
        frames[tuple(sorted(options.items()))] = result.frames
        return result.latents, counter.take()

    results = run_features(TOY_FEATURES, sample, runs)
    identity = {}
    for name, options in TOY_FEATURES.items():
        video = frames[tuple(sorted(options.items()))]
        identity[name] = check_identity(references, video, vfm, names=list(DEMO_NAMES),
                                        settings=IdentitySettings(sample_frames=len(video)),
                                        backbone_name="efficientnet-lite0").overall
    return report(f"shipped toy model, {runs} interleaved runs (median wall time)", results, identity)


def wan_shape(runs: int, blocks: int) -> None:
    dit = tiny_dit(0, **WAN_1_3B, num_layers=blocks)
    settings = SamplingSettings(width=416, height=240, num_frames=9, steps=4, shift=5.0)
    g = torch.Generator().manual_seed(0)
    prompt, negative = torch.randn(1, 512, 4096, generator=g), torch.randn(1, 512, 4096, generator=g)
    references = torch.randn(1, 16, 1, 30, 52, generator=g)
    counter = EvaluationCounter(dit)

    def sample(options):
        result = generate(DiTDenoiser(dit), None, (prompt, negative), settings.replace(**options),
                          reference_latents=references)
        return result.latents, counter.take()

    results = run_features(WAN_FEATURES, sample, runs)
    report(f"Wan2.1-1.3B shapes, {blocks} of 30 blocks, random weights, 9x240x416, 4 steps, {runs} runs", results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--wan-runs", type=int, default=1)
    parser.add_argument("--wan-blocks", type=int, default=2)
    parser.add_argument("--skip-wan", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    best = toy(args.runs)
    if not args.skip_wan:
        wan_shape(args.wan_runs, args.wan_blocks)
    print(f"ratio: {best:.2f}")


if __name__ == "__main__":
    main()
