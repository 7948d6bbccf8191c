"""RefAlign training: flow matching + the reference-alignment loss, from one CPU process to many GPUs.

    python train/train.py --config train/configs/tiny.yaml --output-dir OUT [--max-steps N] [--resume]
    accelerate launch --config_file train/accelerate/ddp.yaml train/train.py --config ... --output-dir ...

Outputs in OUT: `dit.safetensors` (original Wan2.1 names; our loader and ComfyUI's load it), or `lora.safetensors`
(ComfyUI LoraLoader format) in LoRA mode; `projectors.safetensors`; `checkpoints/step-NNNNNN/`; `log.csv`;
`loss.png`. Model, loss, data and cache code live in `refalign_core`."""

import argparse
import copy
import csv
import json
import logging
import os
import shutil
import sys
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from tqdm import tqdm

from refalign_core.alignment import AlignmentProjectors, default_aligned_blocks
from refalign_core.checkpoint import load_dit, save_dit
from refalign_core.toy_world import make_toy_world
from refalign_core.errors import RefAlignInputError
from refalign_core.feature_cache import CACHE_FILE, CacheSettings, FeatureCache, build_cache
from refalign_core.safetensors_io import read_safetensors, write_safetensors
from refalign_core.text_encoder import TextEncoder, load_text_encoder
from refalign_core.tiny import char_tokenizer, tiny_dit, tiny_text_encoder, tiny_vae
from refalign_core.training import (LORA_TARGETS, RefAlignTrainingModule, lora_state_dict_for_comfyui,
                                    make_training_batch)
from refalign_core.vae import load_vae
from refalign_core.vfm import load_vfm

logger = logging.getLogger("refalign.train")
DEFAULTS = yaml.safe_load((Path(__file__).parent / "configs" / "tiny.yaml").read_text())
LOG_COLUMNS = ["step", "loss", "fm", "ra_pos", "ra_neg", "ra_gated", "lr", "timestep"]


def load_config(path: str | None) -> dict:
    """The YAML file over the defaults (tiny.yaml); an unknown key is an error naming it (a typo would else be
    silently ignored)."""
    def merge(base, override, where):
        out = copy.deepcopy(base)
        for k, v in (override or {}).items():
            if k not in base:
                raise RefAlignInputError(f"config {path}: unknown key '{where}{k}' (known: {sorted(base)})")
            nested = isinstance(v, dict) and isinstance(base[k], dict) and k != "toy_world"
            out[k] = merge(base[k], v, f"{where}{k}.") if nested else v
        return out
    if path and not Path(path).is_file():
        raise RefAlignInputError(f"config {path} does not exist")
    return merge(DEFAULTS, yaml.safe_load(Path(path).read_text()) if path else {}, "")


def step_generator(seed: int, step: int, rank: int, micro: int = 0) -> torch.Generator:
    """All randomness of one micro-step (data pick, dropout, augmentation copy, timestep, noise) comes from this:
    a resumed run draws exactly what the uninterrupted run drew, with no RNG state to save."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 4096 + rank) * 64 + micro)


def prepare_cache(cfg: dict, output_dir: Path, accelerator: Accelerator) -> FeatureCache:
    data = cfg["data"]
    cache_dir = Path(data["cache_dir"] or output_dir / "cache")
    if accelerator.is_main_process and not (cache_dir / CACHE_FILE).is_file():
        manifest = data["manifest"] or make_toy_world(output_dir / "data", seed=cfg["seed"], **data["toy_world"])
        vae = tiny_vae(cfg["seed"]) if cfg["model"]["vae"] == "tiny" else load_vae(cfg["model"]["vae"])
        if cfg["model"]["text_encoder"] == "tiny":
            text_encoder = TextEncoder(char_tokenizer(), tiny_text_encoder(cfg["seed"]))
        else:
            text_encoder = load_text_encoder(cfg["model"]["text_encoder"])
        settings = CacheSettings(width=data["width"], height=data["height"], num_frames=data["num_frames"],
                                 fps=data["fps"], augment_copies=data["augment_copies"], seed=cfg["seed"])
        build_cache(manifest, cache_dir, settings, vae, text_encoder, load_vfm(cfg["model"]["vfm"]))
    accelerator.wait_for_everyone()
    return FeatureCache(cache_dir)


def build_model(cfg: dict, vfm_dim: int):
    torch.manual_seed(cfg["seed"])
    spec = cfg["model"]["dit"]
    dit = tiny_dit(cfg["seed"], **(cfg["model"]["dit_config"] or {})) if spec == "tiny" else load_dit(spec)
    dit.train()
    projectors = None
    if cfg["alignment"]["enabled"]:
        blocks = cfg["alignment"]["blocks"] or default_aligned_blocks(dit.config.num_layers)
        projectors = AlignmentProjectors(dit.config.num_attention_heads * dit.config.attention_head_dim, vfm_dim, blocks)
        if cfg["alignment"]["init_projectors"]:  # stage 2 starts from the stage-1 projectors
            tensors, _ = read_safetensors(cfg["alignment"]["init_projectors"], "alignment.init_projectors")
            projectors.load_state_dict(tensors, strict=True)
    if cfg["train"]["mode"] == "lora":
        from peft import LoraConfig
        dit.requires_grad_(False)
        dit.add_adapter(LoraConfig(r=cfg["train"]["lora_rank"], lora_alpha=cfg["train"]["lora_alpha"],
                                   target_modules=LORA_TARGETS, init_lora_weights=True))
    else:
        dit.requires_grad_(True)
    if cfg["train"]["gradient_checkpointing"]:
        dit.enable_gradient_checkpointing()
    a = cfg["alignment"]
    return RefAlignTrainingModule(dit, projectors, ra_weight=a["weight"], shift=cfg["shift"],
                                  pos_margin=a["pos_margin"], neg_margin=a["neg_margin"], neg_weight=a["neg_weight"])


def trainable_state(accelerator: Accelerator, module) -> dict[str, torch.Tensor]:
    """Trainable weights, gathered to full tensors (a collective under FSDP / ZeRO-3: call on every rank)."""
    names = {k for k, p in accelerator.unwrap_model(module).named_parameters() if p.requires_grad}
    return {k: v.detach().cpu().clone() for k, v in accelerator.get_state_dict(module).items() if k in names}


def save_checkpoint(folder: Path, step: int, state: dict, optimizer, scheduler, cfg: dict, ema=None) -> None:
    """Atomic: written to a temp folder, then renamed; a crash leaves either the whole checkpoint or none."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_safetensors(state, tmp / "trainable.safetensors")
    states = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
    torch.save({**states, "ema": ema.state_dict()} if ema is not None else states, tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, "config": cfg}, indent=1))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def latest_checkpoint(output_dir: Path) -> Path | None:
    done = sorted(p for p in (output_dir / "checkpoints").glob("step-*") if (p / "state.json").is_file()
                  and not p.name.endswith(".tmp"))
    return done[-1] if done else None


def load_checkpoint(folder: Path, module, optimizer, scheduler, ema=None) -> int:
    tensors, _ = read_safetensors(folder / "trainable.safetensors", "checkpoint")
    params = dict(module.named_parameters())
    with torch.no_grad():
        for k, v in tensors.items():
            params[k].copy_(v)
    states = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(states["optimizer"])
    scheduler.load_state_dict(states["scheduler"])
    if ema is not None:
        ema.load_state_dict(states["ema"])
    return json.loads((folder / "state.json").read_text())["step"]


def export(module, output_dir: Path, cfg: dict) -> None:
    dit = module.dit
    if cfg["train"]["mode"] == "lora":
        write_safetensors(lora_state_dict_for_comfyui(dit, cfg["train"]["lora_alpha"]), output_dir / "lora.safetensors")
    else:
        save_dit(dit, output_dir / "dit.safetensors")
    if module.projectors is not None:
        write_safetensors({k: v.detach() for k, v in module.projectors.state_dict().items()},
                          output_dir / "projectors.safetensors",
                          {"blocks": json.dumps(module.projectors.block_indices)})


def plot_log(csv_path: Path, png_path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(csv.DictReader(csv_path.open()))
    if not rows:
        return
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
    for ax, keys in zip(axes, (["fm"], ["ra_pos", "ra_neg"], ["lr"])):
        for key in keys:
            points = [(int(r["step"]), float(r[key])) for r in rows if r[key] != ""]
            if not points:
                continue
            steps, values = zip(*points)
            line, = ax.plot(steps, values, alpha=0.35 if key != "lr" else 1.0, label=key)
            if key != "lr":  # exponential moving average: per-step values are noisy (random t, dropout)
                ema, smooth = values[0], []
                for v in values:
                    ema = 0.9 * ema + 0.1 * v
                    smooth.append(ema)
                ax.plot(steps, smooth, color=line.get_color(), label=f"{key} (EMA)")
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png_path, dpi=80)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--max-steps", type=int, help="overrides train.max_steps")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output-dir")
    parser.add_argument("--cache-only", action="store_true", help="build the feature cache and stop")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    cfg = load_config(args.config)
    if args.max_steps is not None:
        cfg["train"]["max_steps"] = args.max_steps
    t = cfg["train"]
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    accelerator = Accelerator(mixed_precision=t["mixed_precision"], gradient_accumulation_steps=t["grad_accum"])

    cache = prepare_cache(cfg, output_dir, accelerator)
    if args.cache_only:
        return 0
    module = build_model(cfg, cache.vfm_dim)
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=t["lr"], betas=(0.9, 0.999), eps=1e-8, weight_decay=t["weight_decay"])
    scheduler = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=t["warmup_steps"])
    ema = EMAModel(params, decay=t["ema_decay"]) if t["ema_decay"] else None  # exported instead of the raw weights
    start = 0
    if args.resume and (checkpoint := latest_checkpoint(output_dir)) is not None:
        start = load_checkpoint(checkpoint, module, optimizer, scheduler, ema)
        logger.info("resumed from %s (step %d)", checkpoint, start)
    module, optimizer = accelerator.prepare(module, optimizer)

    log_path = output_dir / "log.csv"
    if accelerator.is_main_process and (start == 0 or not log_path.is_file()):
        log_path.write_text(",".join(LOG_COLUMNS) + "\n")
    elif accelerator.is_main_process:  # drop rows past the checkpoint we resume from
        rows = log_path.read_text().splitlines()
        log_path.write_text("\n".join([rows[0]] + [r for r in rows[1:] if int(r.split(",")[0]) <= start]) + "\n")
    rank = accelerator.process_index
    bar = tqdm(total=t["max_steps"], initial=start, desc="training", disable=not accelerator.is_main_process)
    for step in range(start, t["max_steps"]):
        for micro in range(t["grad_accum"]):
            generator = step_generator(cfg["seed"], step, rank, micro)
            index = int(torch.randint(0, len(cache), (1,), generator=generator))
            batch = make_training_batch(cache[index], cache.null_prompt, generator, cfg["dropout"]["text"],
                                        cfg["dropout"]["references"], cfg["dropout"]["both"], cfg["text_length"])
            with accelerator.accumulate(module):
                losses = module(batch)
                accelerator.backward(losses.total)
                if accelerator.sync_gradients and t["max_grad_norm"]:
                    accelerator.clip_grad_norm_(params, t["max_grad_norm"])
                optimizer.step()
                optimizer.zero_grad()
        if ema is not None:
            ema.step(params)
        scheduler.step()
        if accelerator.is_main_process:
            kept = batch.keep_references.item() > 0  # RA terms are blank when the references were dropped
            values = [step + 1, losses.total.item(), losses.fm.item(),
                      losses.ra_positive.item() if kept else None,
                      losses.ra_negative.item() if kept and batch.num_references > 1 else None,
                      losses.ra_gated.item(), scheduler.get_last_lr()[0], losses.timestep.item()]
            with log_path.open("a") as f:
                f.write(",".join("" if v is None else f"{v:.6g}" if isinstance(v, float) else str(v)
                                 for v in values) + "\n")
            bar.update(1)
            bar.set_postfix(fm=f"{values[2]:.3f}", ra_pos=f"{values[3] or 0:.3f}")
        if (step + 1) % t["checkpoint_every"] == 0 or step + 1 == t["max_steps"]:
            state = trainable_state(accelerator, module)
            if accelerator.is_main_process:
                folder = output_dir / "checkpoints" / f"step-{step + 1:06d}"
                save_checkpoint(folder, step + 1, state, optimizer, scheduler, cfg, ema)
                print(f"saved checkpoint step {step + 1}", flush=True)
    bar.close()
    accelerator.wait_for_everyone()
    if ema is not None:
        ema.copy_to(params)
    if accelerator.is_main_process:
        export(accelerator.unwrap_model(module), output_dir, cfg)
        plot_log(log_path, output_dir / "loss.png")
        print(f"exported to {output_dir}", flush=True)
    accelerator.end_training()
    return 0


def cli() -> int:
    try:
        return main()
    except RefAlignInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(cli())
