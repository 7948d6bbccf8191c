"""Cost of the RefAlign alignment loss in a training step, tiny config, one process, interleaved, medians:

  cached  = step with RA loss, VFM features read from the cache  ÷ FM-only step   (goal ≤ 1.10)
  online  = step with RA loss, VFM (EfficientNet-Lite0) run every step ÷ FM-only step   (for comparison)

    python bench/ra_overhead.py [--runs N]

The last line is `ratio: <cached median>`."""

import argparse
import statistics
import tempfile
import time

import torch

from refalign_core.alignment import AlignmentProjectors, default_aligned_blocks
from refalign_core.toy_world import make_toy_world
from refalign_core.feature_cache import CacheSettings, FeatureCache, build_cache
from refalign_core.text_encoder import TextEncoder
from refalign_core.tiny import char_tokenizer, tiny_dit, tiny_text_encoder, tiny_vae
from refalign_core.training import RefAlignTrainingModule, make_training_batch
from refalign_core.vfm import load_vfm

BENCH_DIT = dict(num_attention_heads=4, attention_head_dim=32, text_dim=32, freq_dim=64, ffn_dim=512, num_layers=6)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=25)
    args = parser.parse_args()
    folder = tempfile.mkdtemp(prefix="ra_bench_")
    manifest = make_toy_world(f"{folder}/data", num_videos=4, size=128, frames=17, max_subjects=2)
    vfm = load_vfm("efficientnet-lite0")
    settings = CacheSettings(width=128, height=128, num_frames=17, fps=16, augment_copies=2)
    build_cache(manifest, f"{folder}/cache", settings, tiny_vae(), TextEncoder(char_tokenizer(), tiny_text_encoder()),
                vfm, progress=False)
    cache = FeatureCache(f"{folder}/cache")
    sample = cache[1]  # two references
    variants = {}
    for name in ("fm_only", "ra_cached", "ra_online"):
        dit = tiny_dit(0, **BENCH_DIT).train()
        dim = BENCH_DIT["num_attention_heads"] * BENCH_DIT["attention_head_dim"]
        projectors = None if name == "fm_only" else \
            AlignmentProjectors(dim, cache.vfm_dim, default_aligned_blocks(BENCH_DIT["num_layers"]))
        module = RefAlignTrainingModule(dit, projectors, vfm=vfm if name == "ra_online" else None)
        variants[name] = (module, torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4))

    def step(name, seed):
        module, optimizer = variants[name]
        generator = torch.Generator().manual_seed(seed)
        start = time.perf_counter()
        batch = make_training_batch(sample, cache.null_prompt, generator, 0.0, 0.0, 0.0)
        losses = module(batch)
        losses.total.backward()
        optimizer.step()
        optimizer.zero_grad()
        return time.perf_counter() - start

    for name in variants:
        step(name, 0)
    times = {name: [] for name in variants}
    for run in range(args.runs):
        order = list(variants) if run % 2 == 0 else list(variants)[::-1]
        for name in order:
            times[name].append(step(name, run + 1))
    for name, values in times.items():
        print(f"{name}: median {statistics.median(values) * 1000:.1f} ms")
    cached = statistics.median(a / b for a, b in zip(times["ra_cached"], times["fm_only"]))
    online = statistics.median(a / b for a, b in zip(times["ra_online"], times["fm_only"]))
    print(f"online ratio (VFM every step): {online:.3f}")
    print(f"ratio: {cached:.3f}")


if __name__ == "__main__":
    main()
