"""The recipe for the embedded toy models: one command, CPU, fixed seeds.

    python train/make_toy_bundle.py --out models [--work DIR] [--scale 1.0]

1. toy world: training videos of training identities (`refalign_core.toy_world`);
2. text encoder: a word-level tokenizer over the toy vocabulary + a small frozen, seeded umT5;
3. VAE: a `ToyVideoVAE` (Wan2.1 latent layout, 2-D convolutions) trained to reconstruct toy clips and
   references (L1), then its latent mean / std measured and stored in its config;
4. two DiTs with `train/train.py` on the same cached data and steps: RefAlign (RA loss, VFM = EfficientNet-Lite0)
   and a baseline (RA off);
5. bundles `refalign_toy/` and `refalign_toy_baseline/` (sharing VAE and text encoder) and `refalign_toy/recipe.json`
   with the settings, wall times and a SHA-256 of every file.
`--scale` multiplies every step count (the tests use a tiny scale)."""

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from refalign_core.bundles import BUNDLE_FILE
from refalign_core.references import to_chw
from refalign_core.tiny import tiny_text_encoder, word_tokenizer
from refalign_core.toy_vae import ToyVideoVAE
from refalign_core.toy_world import make_toy_world, vocabulary
from refalign_core.training import parse_config, train
from refalign_core.training.data import SkipCounter, load_video_clip
from refalign_core.training.datasets import read_jsonl
from refalign_core.vae import save_vae
from refalign_core.video_io import load_image

RECIPE = {
    "seed": 0,
    "world": {"num_videos": 320, "frames": 17, "size": 64},
    "text_encoder": {"d_model": 64, "d_kv": 16, "d_ff": 128, "num_layers": 2, "num_heads": 4},
    "vae": {"block_channels": [32, 64, 96, 96], "steps": 1400, "lr": 1e-3, "batch": 8, "latent_noise": 0.1},
    "dit": {"num_attention_heads": 4, "attention_head_dim": 32, "in_channels": 16, "out_channels": 16,
            "text_dim": 64, "freq_dim": 256, "ffn_dim": 384, "num_layers": 6},
    "train": {"max_steps": 12000, "lr": 1e-3, "warmup_steps": 200, "checkpoint_every": 6000, "ema_decay": 0.999},
    "defaults": {"width": 64, "height": 64, "num_frames": 17, "steps": 25, "shift": 1.0, "image_scale": 5.0,
                 "text_scale": 7.5, "sampler": "euler", "fps": 8},
}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def train_vae(manifest: Path, settings: dict, seed: int) -> tuple[ToyVideoVAE, float]:
    """A `ToyVideoVAE` trained with L1 on random 5-frame windows of the toy clips plus references as 1-frame clips;
    the decoder sees latents with a little Gaussian noise (`latent_noise` × per-channel std) so it tolerates the
    DiT's imprecision. Cosine learning-rate decay. Its latent mean / std are measured and stored in its config."""
    torch.manual_seed(seed)
    vae = ToyVideoVAE(block_channels=tuple(settings["block_channels"])).train()
    entries = read_jsonl(manifest, SkipCounter())
    clips = torch.stack([load_video_clip(e.video, 17, None, 64, 64) for e in entries])  # [N, 3, 17, 64, 64]
    refs = torch.stack([to_chw(load_image(r.views[0].image))[0] for e in entries for r in e.references])
    refs = (refs * 2 - 1)[:, :, None]  # [R, 3, 1, 64, 64] in [-1, 1]
    optimizer = torch.optim.AdamW(vae.parameters(), lr=settings["lr"], weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, settings["steps"])
    generator = torch.Generator().manual_seed(seed)
    batch = settings["batch"]
    for step in range(settings["steps"]):
        start = int(torch.randint(0, 17 - 5 + 1, (1,), generator=generator))
        loss = 0.0
        for x in (clips[torch.randint(0, len(clips), (batch,), generator=generator), :, start:start + 5],
                  refs[torch.randint(0, len(refs), (batch // 2,), generator=generator)]):
            z = vae.encode(x).latent_dist.mode()
            noise = torch.randn(z.shape, generator=generator) * z.detach().std((0, 2, 3, 4), keepdim=True)
            loss = loss + (vae.decode(z + settings["latent_noise"] * noise).sample - x).abs().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        schedule.step()
        if step % 250 == 0:
            print(f"vae step {step}: L1 {loss.item() / 2:.4f}", flush=True)
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        latents = torch.cat([vae.encode(clips[i:i + 16]).latent_dist.mode() for i in range(0, len(clips), 16)])
        reconstruction = torch.cat([vae.decode(latents[i:i + 16]).sample for i in range(0, len(clips), 16)])
    vae.register_to_config(latents_mean=latents.mean((0, 2, 3, 4)).tolist(),
                           latents_std=latents.std((0, 2, 3, 4)).clamp(min=1e-3).tolist())
    return vae, (reconstruction.clamp(-1, 1) - clips).abs().mean().item()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="models", help="folder that receives refalign_toy/ and refalign_toy_baseline/")
    parser.add_argument("--work", help="scratch folder (default: a temporary one)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every step / video count (tests)")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))  # the recorded hashes assume 2 threads
    recipe = json.loads(json.dumps(RECIPE))
    for section, key in (("world", "num_videos"), ("vae", "steps"), ("train", "max_steps"),
                         ("train", "checkpoint_every"), ("train", "warmup_steps")):
        recipe[section][key] = max(2, int(recipe[section][key] * args.scale))
    work = Path(args.work or tempfile.mkdtemp(prefix="refalign_toy_"))
    out = Path(args.out)
    bundle, baseline = out / "refalign_toy", out / "refalign_toy_baseline"
    for folder in (bundle, baseline):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    times = {}
    start = time.perf_counter()
    manifest = make_toy_world(work / "world", split="train", seed=recipe["seed"], **recipe["world"])
    times["world_s"] = time.perf_counter() - start

    start = time.perf_counter()
    tokenizer = word_tokenizer(vocabulary())
    encoder = tiny_text_encoder(recipe["seed"], vocab_size=len(tokenizer), **recipe["text_encoder"])
    encoder.save_pretrained(bundle / "text_encoder", safe_serialization=True)
    tokenizer.save_pretrained(bundle / "text_encoder")
    vae, vae_loss = train_vae(manifest, recipe["vae"], recipe["seed"])
    save_vae(vae, bundle / "vae.safetensors")
    times["vae_s"] = time.perf_counter() - start

    for name, folder, ra in (("refalign", bundle, True), ("baseline", baseline, False)):
        config = parse_config({
            "seed": recipe["seed"],
            "shift": recipe["defaults"]["shift"],  # a 4×4-token frame needs no high-noise shift; sampled alike
            "model": {"dit": "tiny", "dit_config": recipe["dit"], "vae": str(bundle / "vae.safetensors"),
                      "text_encoder": str(bundle / "text_encoder"), "vfm": "efficientnet-lite0"},
            "data": {"datasets": [{"path": str(manifest)}], "buckets": {"sizes": [[64, 64]], "frames": [17]},
                     "fps": 16, "augment_copies": 4, "cache_dir": str(work / "cache"), "num_workers": 0},
            "train": {**recipe["train"], "mixed_precision": "no", "keep_last": 1},
            "memory": {"gradient_checkpointing": False},
            "alignment": {"enabled": ra},
        }, f"toy recipe ({name})")
        start = time.perf_counter()
        train(config, work / name)
        times[f"{name}_s"] = time.perf_counter() - start
        shutil.copyfile(work / name / "dit.safetensors", folder / "dit.safetensors")
        shutil.copyfile(work / name / "log.csv", folder / "train_log.csv")
        if ra:
            shutil.copyfile(work / name / "projectors.safetensors", folder / "projectors.safetensors")
    shared = {"vae": "vae.safetensors", "text_encoder": "text_encoder"}
    for folder, prefix in ((bundle, ""), (baseline, "../refalign_toy/")):
        manifest_json = {"format": "refalign-bundle", "version": 1, "dit": "dit.safetensors",
                         **{k: prefix + v for k, v in shared.items()}, "defaults": recipe["defaults"]}
        (folder / BUNDLE_FILE).write_text(json.dumps(manifest_json, indent=1))
    files = {str(p.relative_to(out)): sha256(p) for folder in (bundle, baseline) for p in sorted(folder.rglob("*"))
             if p.is_file() and p.name != "recipe.json"}
    record = {"recipe": recipe, "command": "python train/make_toy_bundle.py --out models", "vae_l1_training_clips": vae_loss,
              "wall_seconds": {k: round(v, 1) for k, v in times.items()}, "torch": torch.__version__,
              "threads": torch.get_num_threads(), "sha256": files}
    (bundle / "recipe.json").write_text(json.dumps(record, indent=1))
    print(json.dumps(record["wall_seconds"]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
