"""Training throughput of the toy recipe's DiT: the previous recipe's step against today's, side by side.

Both train the shipped model size (6 blocks, dim 128, FFN 384) on cached toy-world clips at 128×128 with 1–3
references, batch 4, RA loss on blocks 0–1; a step = read the batch from the feature cache, CFG dropout, forward,
backward, AdamW. What differs:

* previous: 9-frame clips, prompts padded to Wan's 512 tokens, EfficientNet-Lite0 teacher tokens (1392-d), batches
  of mixed reference counts padded to the largest (a self-attention key mask);
* today: 5-frame clips, prompts padded to 16 tokens (the toy text encoder's length; a toy caption has at most 15),
  the toy teacher's tokens (64-d), batches of one reference count (`data.buckets.by_references`).

The two run interleaved (A B, then B A) over the same number of batches; medians of samples per second.

    python bench/train_throughput.py [--runs N]

Prints samples/s for each and, per change alone (on top of the previous step), its share of the gain, the cost of
the RA loss (today's step ÷ the same step with RA off, goal ≤ 1.10); last line `ratio: <today's samples/s ÷ the
previous step's>` (goal ≥ 3)."""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from refalign_core.models.text_encoder import TextEncoder
from refalign_core.toy.text_model import umt5_encoder, word_tokenizer
from refalign_core.toy.world import make_toy_world, vocabulary
from refalign_core.training.alignment import AlignmentProjectors
from refalign_core.training.buckets import BucketBatchSampler
from refalign_core.training.cache import CacheSettings, FeatureCache, build_cache, write_index
from refalign_core.training.data import SkipCounter
from refalign_core.training.datasets import read_jsonl
from refalign_core.training.module import RefAlignTrainingModule, make_training_batch
from refalign_core.models.vfm import ConvTokenVFM, load_vfm

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tiny random models
from tiny_models import tiny_dit, tiny_vae  # noqa: E402

TOY_DIT = dict(num_attention_heads=4, attention_head_dim=32, text_dim=64, freq_dim=256, ffn_dim=384, num_layers=6)


def build(folder: str, vfm, frames: int) -> FeatureCache:
    manifest = make_toy_world(f"{folder}/data", num_videos=24, frames=frames, max_subjects=3)
    entries = read_jsonl(manifest, SkipCounter())
    tokenizer = word_tokenizer(vocabulary())
    text = TextEncoder(tokenizer, umt5_encoder(0, len(tokenizer), d_model=64, d_kv=16, d_ff=128, num_layers=2,
                                                    num_heads=4))
    encoders = SimpleNamespace(vae=tiny_vae(), text_encoder=text, vfm=vfm)
    settings = CacheSettings(sizes=((128, 128),), frames=(frames,), fps=None, augment_copies=2)
    build_cache(entries, f"{folder}/cache", settings, encoders, progress=False)
    write_index(entries, f"{folder}/cache")
    return FeatureCache(f"{folder}/cache")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=12, help="batches per variant (each timed once)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    efficientnet, toy_teacher = load_vfm("efficientnet-lite0"), ConvTokenVFM(dim=64).eval()
    caches = {"previous": build(tempfile.mkdtemp(prefix="throughput_prev_"), efficientnet, 9),
              "frames": build(tempfile.mkdtemp(prefix="throughput_frames_"), efficientnet, 5),
              "teacher": build(tempfile.mkdtemp(prefix="throughput_teacher_"), toy_teacher, 9),
              "today": build(tempfile.mkdtemp(prefix="throughput_today_"), toy_teacher, 5)}
    variants = {  # name -> (cache, text length, one reference count per batch)
        "previous": ("previous", 512, False),
        "text length 16": ("previous", 16, False),
        "5 frames": ("frames", 512, False),
        "toy teacher": ("teacher", 512, False),
        "one reference count per batch": ("previous", 512, True),
        "today": ("today", 16, True),
        "today, RA loss off": ("today", 16, True),
    }
    modules = {}
    for name, (cache, _, _) in variants.items():
        projectors = AlignmentProjectors(128, caches[cache].vfm_dim, [0, 1]) if "RA loss off" not in name else None
        module = RefAlignTrainingModule(tiny_dit(0, **TOY_DIT).train(), projectors, shift=2.0,
                                        loss_weighting="uniform")
        optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4)
        modules[name] = (module, optimizer)

    def step(name: str, run: int) -> float:
        cache_name, text_length, by_references = variants[name]
        cache = caches[cache_name]
        module, optimizer = modules[name]
        groups = cache.batch_groups(by_references)
        batches = BucketBatchSampler(groups, cache.repeats, 4, seed=run).epoch_batches(0)
        indices = next(b for b in batches if len(b) == 4)
        start = time.perf_counter()
        samples = [cache[i] for i in indices]
        batch = make_training_batch(samples, cache.null_prompt, torch.Generator().manual_seed(run),
                                    text_length=text_length)
        losses = module(batch)
        losses.total.backward()
        optimizer.step()
        optimizer.zero_grad()
        return 4 / (time.perf_counter() - start)

    for name in variants:
        step(name, 0)
    rates = {name: [] for name in variants}
    for run in range(args.runs):
        order = list(variants) if run % 2 == 0 else list(variants)[::-1]
        for name in order:
            rates[name].append(step(name, run + 1))
    previous = statistics.median(rates["previous"])
    for name in variants:
        median = statistics.median(rates[name])
        print(f"{name}: {median:.2f} samples/s ({median / previous:.2f}x the previous step)")
    ra_cost = statistics.median(off / on for on, off in zip(rates["today"], rates["today, RA loss off"]))
    print(f"RA step / FM-only step (today, cached teacher tokens): {ra_cost:.3f}  (goal <= 1.10)")
    print(f"ratio: {statistics.median(rates['today']) / previous:.3f}")


if __name__ == "__main__":
    main()
