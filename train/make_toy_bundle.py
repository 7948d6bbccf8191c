"""The recipe for the embedded toy models: one command, CPU, fixed seeds.

    python train/make_toy_bundle.py [--out refalign_core/toy/models] [--work DIR] [--scale 1.0]
                                    [--ablation-models DIR]

1. toy world: training clips of training identities (`refalign_core.toy.world`);
2. text encoder: a word-level tokenizer over the toy vocabulary (prompts padded to 16 tokens, not Wan's 512: the
   captions are at most 15) + a small frozen, seeded umT5;
3. VAE: a `ToyVideoVAE` (Wan2.1 latent layout, 2-D convolutions) trained to reconstruct crops of toy clips and
   references (L1), then its latent mean / std measured on whole clips and stored in its config;
4. the world judge (`refalign_core.toy.judge`), calibrated on clips of held-out identities, as rendered and after a
   VAE encode + decode (the most any DiT with this VAE can score);
5. the toy teacher (`refalign_core.toy.teacher`), a VFM trained on references of training identities only;
6. two DiTs with `refalign_core.training.train` on the same cached data, steps and seed: RefAlign (RA loss with the
   toy teacher) and the baseline (RA off);
7. bundles `refalign_toy/` and `refalign_toy_baseline/` (each whole: DiT, VAE, text encoder, defaults), `judge.
   safetensors`, `teacher.safetensors` and `refalign_toy/recipe.json` with the settings, wall times, the judge's
   calibration, the teachers' retrieval and a SHA-256 of every file.
With `--ablation-models DIR` it then also trains the ablation's models (not shipped) into bundles in DIR: positive-
only RA, RefAlign with EfficientNet-Lite0 as the teacher, and RefAlign and the baseline again with training seed 1.
`--scale` multiplies every step / video count (the tests use a tiny scale). With `--work DIR` an interrupted run
picks up where it stopped: finished stages (world, text encoder + VAE, judge, teacher, caches) are reused when their
recorded settings match, and a DiT resumes bit-exactly from its newest checkpoint."""

import argparse
import csv
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from refalign_core.inference.bundles import BUNDLE_FILE
from refalign_core.inference.references import to_chw
from refalign_core.toy.judge import WorldJudge, calibrate, save_judge, train_judge
from refalign_core.toy.teacher import teacher_report, train_teacher
from refalign_core.toy.text_model import umt5_encoder, word_tokenizer
from refalign_core.toy.vae import ToyVideoVAE
from refalign_core.toy.world import FPS, make_toy_world, vocabulary
from refalign_core.training import parse_config, train
from refalign_core.training.checkpoints import complete_checkpoints
from refalign_core.training.data import SkipCounter, load_video_clip
from refalign_core.training.datasets import read_jsonl
from refalign_core.models.vae import load_vae, save_vae
from refalign_core.models.vfm import load_vfm
from refalign_core.inference.video_io import load_image

OUT = Path(__file__).resolve().parents[1] / "refalign_core" / "toy" / "models"
RECIPE = {
    "seed": 0,
    "world": {"num_videos": 2000, "frames": 5, "size": 128},
    "text_encoder": {"d_model": 64, "d_kv": 16, "d_ff": 128, "num_layers": 2, "num_heads": 4},
    "vae": {"block_channels": [32, 64, 96, 96], "steps": 1000, "lr": 1e-3, "batch": 8, "crop": 64,
            "latent_noise": 0.1},
    "dit": {"num_attention_heads": 4, "attention_head_dim": 32, "in_channels": 16, "out_channels": 16,
            "text_dim": 64, "freq_dim": 256, "ffn_dim": 384, "num_layers": 6},
    "train": {"max_steps": 5000, "batch_size": 4, "lr": 1e-3, "warmup_steps": 200, "checkpoint_every": 500,
              "ema_decay": 0.999, "loss_weighting": "uniform"},
    "text_length": 16,
    "judge": {"clips": 1200, "steps": 2500, "batch": 128},
    "calibration_clips": 96,  # world clips of held-out identities the judge is calibrated on
    "teacher": {"views": 16, "steps": 1500, "batch": 64, "dim": 64, "width": 32},
    "augment_copies": 2,
    "alignment_blocks": [0, 1],
    "defaults": {"width": 128, "height": 128, "num_frames": 5, "steps": 25, "shift": 2.0, "image_scale": 2.5,
                 "text_scale": 2.5, "sampler": "euler", "fps": FPS},
}
SHIPPED = {  # bundle folder -> what differs from the recipe: alignment settings, teacher, training seed
    "refalign_toy": {"alignment": {"enabled": True}, "vfm": "toy-teacher"},
    "refalign_toy_baseline": {"alignment": {"enabled": False}, "vfm": "toy-teacher"},
}
ABLATION = {
    "refalign_toy_positive_only": {"alignment": {"enabled": True, "neg_weight": 0.0}, "vfm": "toy-teacher"},
    "refalign_toy_efficientnet": {"alignment": {"enabled": True}, "vfm": "efficientnet-lite0"},
    "refalign_toy_seed1": {"alignment": {"enabled": True}, "vfm": "toy-teacher", "seed": 1},
    "refalign_toy_baseline_seed1": {"alignment": {"enabled": False}, "vfm": "toy-teacher", "seed": 1},
}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def train_vae(manifest: Path, settings: dict, frames: int, size: int, seed: int) -> tuple[ToyVideoVAE, float]:
    """A `ToyVideoVAE` trained with L1 on random 5-frame windows of the clips and on references as 1-frame clips,
    both as random `crop`-pixel crops (it is convolutional: crops teach it the whole frame at a fraction of the
    cost); the decoder sees latents with a little Gaussian noise (`latent_noise` × per-channel std) so it tolerates
    the DiT's imprecision. Cosine learning-rate decay. Its latent mean / std are measured on whole clips."""
    torch.manual_seed(seed)
    vae = ToyVideoVAE(block_channels=tuple(settings["block_channels"])).train()
    entries = read_jsonl(manifest, SkipCounter())
    clips = torch.stack([load_video_clip(e.video, frames, None, size, size) for e in entries])  # [N, 3, F, S, S]
    refs = torch.stack([to_chw(load_image(r.views[0].image))[0] for e in entries for r in e.references])
    refs = (refs * 2 - 1)[:, :, None]  # [R, 3, 1, S, S] in [-1, 1]
    optimizer = torch.optim.AdamW(vae.parameters(), lr=settings["lr"], weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, settings["steps"])
    generator = torch.Generator().manual_seed(seed)
    batch, crop = settings["batch"], settings["crop"]

    def pick(x, count):
        chosen = x[torch.randint(0, len(x), (count,), generator=generator)]
        top, left = (int(torch.randint(0, size - crop + 1, (1,), generator=generator)) // 8 * 8 for _ in range(2))
        return chosen[..., top:top + crop, left:left + crop]

    for step in range(settings["steps"]):
        start = int(torch.randint(0, frames - 5 + 1, (1,), generator=generator))
        loss = 0.0
        for x in (pick(clips, batch)[:, :, start:start + 5], pick(refs, batch // 2)):
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


def stage(work: Path, name: str, settings: dict, build) -> float | None:
    """Run `build(folder)` into `work/name`, or reuse that folder when an earlier run finished it with the same
    settings. Returns the stage's wall seconds as measured by the run that built it (None if it did not record
    them)."""
    folder, done = work / name, work / name / "stage.json"
    if done.is_file():
        record = json.loads(done.read_text())
        if record["settings"] == settings:
            print(f"{name}: reusing {folder}", flush=True)
            return record["seconds"]
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    start = time.perf_counter()
    build(folder)
    seconds = time.perf_counter() - start
    done.write_text(json.dumps({"settings": settings, "seconds": seconds}))
    return seconds


def dit_config(recipe: dict, manifest: Path, bundle: Path, work: Path, variant: dict, name: str):
    """The training config of one DiT variant (all variants share data, steps and, unless set, the seed; variants
    with the same teacher and seed share a feature cache)."""
    world, seed = recipe["world"], variant.get("seed", recipe["seed"])
    vfm = str(work / "teacher" / "teacher.safetensors") if variant["vfm"] == "toy-teacher" else variant["vfm"]
    return parse_config({
        "seed": seed,
        "shift": recipe["defaults"]["shift"],  # sampled with the same shift
        "model": {"dit_config": recipe["dit"], "vae": str(bundle / "vae.safetensors"),
                  "text_encoder": str(bundle / "text_encoder"), "vfm": vfm},
        "data": {"datasets": [{"path": str(manifest)}], "fps": None, "augment_copies": recipe["augment_copies"],
                 "num_workers": 0,
                 "buckets": {"sizes": [[world["size"], world["size"]]], "frames": [world["frames"]],
                             "by_references": True},
                 "cache_dir": str(work / f"cache-{variant['vfm']}-seed{seed}")},
        "train": {**recipe["train"], "mixed_precision": "no", "keep_last": 1},
        "memory": {"gradient_checkpointing": False},
        "alignment": {"blocks": recipe["alignment_blocks"], **variant["alignment"]},
    }, f"toy recipe ({name})")


def build_autoencoders(recipe: dict, work: Path) -> tuple[Path, float, dict]:
    """Stages 1–3 into `work`: the world, the text encoder and the VAE. Returns (manifest, the VAE's L1 on the
    training clips, stage wall seconds)."""
    times = {"world_s": stage(work, "world", {"seed": recipe["seed"], **recipe["world"]},
                              lambda folder: make_toy_world(folder, split="train", seed=recipe["seed"],
                                                            **recipe["world"]))}
    manifest = work / "world" / "manifest.jsonl"

    def build(folder: Path) -> None:
        tokenizer = word_tokenizer(vocabulary())
        encoder = umt5_encoder(recipe["seed"], len(tokenizer), **recipe["text_encoder"])
        encoder.save_pretrained(folder / "text_encoder", safe_serialization=True)
        tokenizer.save_pretrained(folder / "text_encoder")
        vae, vae_loss = train_vae(manifest, recipe["vae"], recipe["world"]["frames"], recipe["world"]["size"],
                                  recipe["seed"])
        save_vae(vae, folder / "vae.safetensors")
        (folder / "vae_l1.json").write_text(json.dumps(vae_loss))

    autoencoder_settings = {k: recipe[k] for k in ("seed", "world", "text_encoder", "vae")}
    times["vae_s"] = stage(work, "autoencoders", autoencoder_settings, build)
    return manifest, json.loads((work / "autoencoders" / "vae_l1.json").read_text()), times


def build_judge_and_teacher(recipe: dict, work: Path) -> tuple[dict, dict]:
    """Stages 4–5 into `work`: the world judge (+ its calibration on world clips, as they are and through the VAE)
    and the toy teacher (+ its report next to EfficientNet-Lite0's). Returns (stage wall seconds, reports)."""
    def judge(folder: Path) -> None:
        net = train_judge(seed=recipe["seed"], **recipe["judge"])
        save_judge(net, folder / "judge.safetensors")
        (folder / "calibration.json").write_text(json.dumps(calibrate(WorldJudge(net), recipe["calibration_clips"])))

    def through_vae(folder: Path) -> None:
        judge = WorldJudge.load(work / "judge" / "judge.safetensors")
        vae = load_vae(work / "autoencoders" / "vae.safetensors")
        (folder / "calibration.json").write_text(json.dumps(calibrate(judge, recipe["calibration_clips"], vae=vae)))

    def teacher(folder: Path) -> None:
        train_teacher(seed=recipe["seed"], **recipe["teacher"]).save(folder / "teacher.safetensors")

    def report(folder: Path) -> None:
        teachers = {"toy teacher": load_vfm(str(work / "teacher" / "teacher.safetensors")),
                    "efficientnet-lite0": load_vfm("efficientnet-lite0")}
        (folder / "report.json").write_text(json.dumps({name: teacher_report(vfm) for name, vfm in teachers.items()}))

    teacher_settings = {"seed": recipe["seed"], **recipe["teacher"]}
    times = {"judge_s": stage(work, "judge", {"seed": recipe["seed"], "calibration_clips": recipe["calibration_clips"],
                                              **recipe["judge"]}, judge),
             "teacher_s": stage(work, "teacher", teacher_settings, teacher)}
    stage(work, "teacher_report", teacher_settings, report)
    stage(work, "judge_through_vae", {k: recipe[k] for k in ("seed", "world", "text_encoder", "vae", "judge",
                                                             "calibration_clips")},
          through_vae)
    reports = {"judge_calibration": json.loads((work / "judge" / "calibration.json").read_text()),
               "judge_calibration_through_vae": json.loads((work / "judge_through_vae" / "calibration.json")
                                                           .read_text()),
               "teachers": json.loads((work / "teacher_report" / "report.json").read_text())}
    return times, reports


def write_text_encoder(source: Path, folder: Path, length: int) -> None:
    """Copy the text encoder, its tokenizer set to pad prompts to `length` tokens."""
    shutil.copytree(source, folder)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    tokenizer.model_max_length = length
    tokenizer.save_pretrained(folder)


def train_variants(variants: dict, recipe: dict, manifest: Path, bundle: Path, work: Path, out: Path) -> dict:
    """Train each DiT variant and write it as a whole bundle `out/<name>/` (the VAE and text encoder of `bundle`).
    Returns per variant the seconds its training steps took (log.csv: kept across resumed runs)."""
    times = {}
    for name, variant in variants.items():
        folder = out / name
        train(dit_config(recipe, manifest, bundle, work, variant, name), work / name,
              resume=bool(complete_checkpoints(work / name / "checkpoints")))
        with (work / name / "log.csv").open() as log:
            times[f"{name}_steps_s"] = sum(float(row["seconds"]) for row in csv.DictReader(log))
        if folder != bundle:  # every bundle is whole on its own (a bundle names no file outside itself)
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            shutil.copyfile(bundle / "vae.safetensors", folder / "vae.safetensors")
            shutil.copytree(bundle / "text_encoder", folder / "text_encoder")
        shutil.copyfile(work / name / "dit.safetensors", folder / "dit.safetensors")
        shutil.copyfile(work / name / "log.csv", folder / "train_log.csv")
        if variant["alignment"]["enabled"]:
            shutil.copyfile(work / name / "projectors.safetensors", folder / "projectors.safetensors")
        manifest_json = {"format": "refalign-bundle", "version": 1, "dit": "dit.safetensors",
                         "vae": "vae.safetensors", "text_encoder": "text_encoder", "defaults": recipe["defaults"]}
        (folder / BUNDLE_FILE).write_text(json.dumps(manifest_json, indent=1))
    return times


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(OUT), help="folder that receives the shipped bundles, judge and teacher")
    parser.add_argument("--work", help="scratch folder (default: a temporary one)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every step / video count (tests)")
    parser.add_argument("--ablation-models", help="also train the ablation's models into bundles in this folder")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))  # the recorded hashes assume 2 threads
    recipe = json.loads(json.dumps(RECIPE))
    for section, key in (("world", "num_videos"), ("vae", "steps"), ("train", "max_steps"),
                         ("train", "checkpoint_every"), ("train", "warmup_steps"), ("judge", "clips"),
                         ("judge", "steps"), ("teacher", "views"), ("teacher", "steps")):
        recipe[section][key] = max(2, int(recipe[section][key] * args.scale))
    recipe["calibration_clips"] = max(2, int(recipe["calibration_clips"] * args.scale))
    work = Path(args.work or tempfile.mkdtemp(prefix="refalign_toy_"))
    out = Path(args.out)
    bundle = out / "refalign_toy"
    for name in SHIPPED:
        shutil.rmtree(out / name, ignore_errors=True)
    bundle.mkdir(parents=True)
    manifest, vae_loss, times = build_autoencoders(recipe, work)
    shutil.copyfile(work / "autoencoders" / "vae.safetensors", bundle / "vae.safetensors")
    write_text_encoder(work / "autoencoders" / "text_encoder", bundle / "text_encoder", recipe["text_length"])
    stage_times, reports = build_judge_and_teacher(recipe, work)
    times |= stage_times
    shutil.copyfile(work / "judge" / "judge.safetensors", out / "judge.safetensors")
    shutil.copyfile(work / "teacher" / "teacher.safetensors", out / "teacher.safetensors")
    times |= train_variants(SHIPPED, recipe, manifest, bundle, work, out)

    shipped = [out / "judge.safetensors", out / "teacher.safetensors"] + [
        p for name in SHIPPED for p in sorted((out / name).rglob("*")) if p.is_file() and p.name != "recipe.json"]
    record = {"recipe": recipe, "command": "python train/make_toy_bundle.py", "vae_l1_training_clips": vae_loss,
              **reports, "wall_seconds": {k: None if v is None else round(v, 1) for k, v in times.items()},
              "torch": torch.__version__, "threads": torch.get_num_threads(),
              "sha256": {str(p.relative_to(out)): sha256(p) for p in shipped}}
    (bundle / "recipe.json").write_text(json.dumps(record, indent=1))
    print(json.dumps(record["wall_seconds"]), flush=True)
    if args.ablation_models:
        ablation_times = train_variants(ABLATION, recipe, manifest, bundle, work, Path(args.ablation_models))
        print(json.dumps({k: round(v, 1) for k, v in ablation_times.items()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
