"""Training throughput on cached features: samples/s at batch 1, 2 and 4, and the cost of the RefAlign loss.

Tiny 6-block DiT (dim 128), toy-world clips at 128×128, 17 frames, 1–3 references (batches padded to the largest
count), one process; a step = read the batch from the feature cache, CFG dropout, forward, backward, AdamW. Variants
run interleaved (A B C …, then reversed) with the same batches and seeds; medians.

    python bench/train_throughput.py [--runs N]

Prints samples/s per batch size, RA step ÷ FM-only step (goal ≤ 1.10; cached VFM tokens), the VFM-online step for
comparison, and last `ratio: <samples/s at batch 4 ÷ batch 1>`."""

import argparse
import statistics
import tempfile
import time
from types import SimpleNamespace

import torch

from refalign_core.text_encoder import TextEncoder
from refalign_core.toy.tiny import char_tokenizer, tiny_dit, tiny_text_encoder, tiny_vae
from refalign_core.toy.world import make_toy_world
from refalign_core.training.alignment import AlignmentProjectors, default_aligned_blocks
from refalign_core.training.buckets import BucketBatchSampler
from refalign_core.training.cache import CacheSettings, FeatureCache, build_cache, write_index
from refalign_core.training.data import SkipCounter
from refalign_core.training.datasets import read_jsonl
from refalign_core.training.module import RefAlignTrainingModule, make_training_batch
from refalign_core.vfm import load_vfm

BENCH_DIT = dict(num_attention_heads=4, attention_head_dim=32, text_dim=32, freq_dim=64, ffn_dim=512, num_layers=6)


def build(folder: str, vfm, store_images: bool) -> FeatureCache:
    manifest = make_toy_world(f"{folder}/data", num_videos=8, size=128, frames=17, max_subjects=3)
    entries = read_jsonl(manifest, SkipCounter())
    encoders = SimpleNamespace(vae=tiny_vae(), text_encoder=TextEncoder(char_tokenizer(), tiny_text_encoder()), vfm=vfm)
    settings = CacheSettings(sizes=((128, 128),), frames=(17,), fps=16, augment_copies=2, store_images=store_images)
    build_cache(entries, f"{folder}/cache", settings, encoders, progress=False)
    write_index(entries, f"{folder}/cache")
    return FeatureCache(f"{folder}/cache")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(2)
    vfm = load_vfm("efficientnet-lite0")
    cached = build(tempfile.mkdtemp(prefix="throughput_"), vfm, store_images=False)
    online = build(tempfile.mkdtemp(prefix="throughput_online_"), vfm, store_images=True)
    dim = BENCH_DIT["num_attention_heads"] * BENCH_DIT["attention_head_dim"]
    blocks = default_aligned_blocks(BENCH_DIT["num_layers"])

    variants = {}  # name -> (module, optimizer, cache, batch size)
    for batch in (1, 2, 4):
        for name, ra, cache, with_vfm in (("fm_only", False, cached, False), ("ra_cached", True, cached, False),
                                          ("ra_online", True, online, True)):
            if name != "ra_cached" and batch != 1:
                continue
            projectors = AlignmentProjectors(dim, vfm.dim, blocks) if ra else None
            module = RefAlignTrainingModule(tiny_dit(0, **BENCH_DIT).train(), projectors,
                                            vfm=vfm if with_vfm else None)
            optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)
            variants[f"{name}@{batch}"] = (module, optimizer, cache, batch)

    def step(name: str, run: int) -> float:
        module, optimizer, cache, batch_size = variants[name]
        indices = BucketBatchSampler(cache.buckets, cache.repeats, batch_size, seed=run).epoch_batches(0)[0]
        start = time.perf_counter()
        samples = [cache[i] for i in indices]
        batch = make_training_batch(samples, cache.null_prompt, torch.Generator().manual_seed(run))
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
    rates = {}
    for batch in (1, 2, 4):
        per_step = statistics.median(times[f"ra_cached@{batch}"])
        rates[batch] = batch / per_step
        print(f"batch {batch}: {rates[batch]:.2f} samples/s ({per_step * 1000:.0f} ms per step, RA loss, cached)")
    ra = statistics.median(a / b for a, b in zip(times["ra_cached@1"], times["fm_only@1"]))
    vfm_online = statistics.median(a / b for a, b in zip(times["ra_online@1"], times["fm_only@1"]))
    print(f"RA step / FM-only step (batch 1, VFM tokens cached): {ra:.3f}  (goal <= 1.10)")
    print(f"RA step with the VFM run every step / FM-only step: {vfm_online:.3f}")
    print(f"ratio: {rates[4] / rates[1]:.3f}")


if __name__ == "__main__":
    main()
