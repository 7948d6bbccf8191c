"""`train(config, output_dir)`: RefAlign training, from one CPU process to many GPUs (accelerate: DDP, FSDP,
DeepSpeed).

Outputs in `output_dir`: `dit.safetensors` (original Wan2.1 names: our loader and ComfyUI's diffusion-model loader
read it) or `lora.safetensors` (ComfyUI LoraLoader keys) in LoRA mode; `projectors.safetensors`;
`checkpoints/step-N/`; `log.csv`; `loss.png`; `previews/` when sample prompts are given."""

import csv
import functools
import importlib.util
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
from accelerate.utils import DistributedType

from ..checkpoint import CONFIG_METADATA_KEY, DTYPES, apply_layerwise_casting, diffusers_to_original_key, load_dit, \
    validated_original
from ..errors import RefAlignInputError
from ..paths import check_output_folder
from ..files import OutputLock
from ..safetensors_io import read_safetensors, read_safetensors_shapes, write_safetensors
from ..transformer_refalign import RefAlignTransformer3DModel
from ..text_encoder import TextEncoder, load_text_encoder
from ..vae import load_vae
from ..vfm import load_vfm
from .alignment import AlignmentProjectors, default_aligned_blocks
from .buckets import BucketBatchSampler
from .cache import CacheSettings, FeatureCache, build_cache, cache_fingerprint, check_fingerprint, \
    estimate_sample_bytes, missing_entries, write_index
from .checkpoints import Checkpoints, complete_checkpoints, drop_rows_after, newest_checkpoint
from .config import TrainingConfig, resume_differences
from .data import SkipCounter
from .datasets import read_datasets
from .module import LORA_TARGETS, RefAlignTrainingModule, lora_state_dict_for_comfyui, make_training_batch
from .previews import Previews, encode_preview_inputs, read_identity_log, read_sample_prompts

logger = logging.getLogger("refalign.train")
LOG_COLUMNS = ["step", "loss", "fm", "ra_pos", "ra_neg", "ra_gated", "lr", "timestep", "batch", "seconds"]
WEIGHT_DTYPES = {name: DTYPES[name] for name in ("bf16", "fp8_e4m3fn")}  # memory.base_weights


@dataclass
class TrainingResult:
    output_dir: Path
    step: int
    files: dict[str, Path]


def step_generator(seed: int, step: int, rank: int, micro: int = 0) -> torch.Generator:
    """All randomness of one micro-step (dropout, augmentation copy, timestep, noise) comes from this: a resumed
    run draws exactly what the uninterrupted run drew, with no RNG state to save."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 4096 + rank) * 64 + micro)


class Encoders:
    """The frozen models that turn clips and preview inputs into features, each loaded on first use."""

    def __init__(self, config: TrainingConfig, device):
        self.model, self.seed, self.device = config.model, config.seed, device

    @functools.cached_property
    def vae(self):
        if self.model.vae == "tiny":
            from ..toy.tiny import tiny_vae
            return tiny_vae(self.seed).to(self.device)
        return load_vae(self.model.vae, device=self.device)

    @functools.cached_property
    def text_encoder(self) -> TextEncoder:
        if self.model.text_encoder == "tiny":
            from ..toy.tiny import char_tokenizer, tiny_text_encoder
            return TextEncoder(char_tokenizer(), tiny_text_encoder(self.seed).to(self.device))
        return load_text_encoder(self.model.text_encoder, device=self.device)

    @functools.cached_property
    def vfm(self):
        return load_vfm(self.model.vfm).to(self.device)

    def release_text_encoder(self) -> None:
        self.__dict__.pop("text_encoder", None)


def _dataset_entries(config: TrainingConfig, output_dir: Path, accelerator):
    """The clips of every configured dataset (a generated toy world when none is configured)."""
    sources = config.data.datasets
    if not sources:
        from ..toy.world import make_toy_world
        from .config import DatasetSource

        manifest = output_dir / "data" / "manifest.jsonl"
        if accelerator.is_main_process and not manifest.is_file():
            make_toy_world(output_dir / "data", seed=config.seed, num_videos=config.data.toy_world.num_videos,
                           size=config.data.toy_world.size, frames=config.data.toy_world.frames)
        accelerator.wait_for_everyone()
        sources = [DatasetSource(path=str(manifest))]
    skipped = SkipCounter()
    entries = read_datasets(sources, skipped, config.data.max_references)
    if skipped.total and accelerator.is_main_process:
        logger.warning("datasets: %d entries skipped (%s)", skipped.total, skipped.reasons)
    return entries


def prepare_cache(config: TrainingConfig, output_dir: Path, accelerator, encoders: Encoders) -> FeatureCache:
    """Build what is missing of the feature cache (all processes, each its share), then index this run's clips."""
    cache_dir = Path(config.data.cache_dir or output_dir / "cache")
    entries = _dataset_entries(config, output_dir, accelerator)
    if accelerator.is_main_process:
        check_fingerprint(cache_dir, cache_fingerprint(config))
    accelerator.wait_for_everyone()
    settings = CacheSettings.from_config(config)
    todo = missing_entries(entries, cache_dir)
    if todo and accelerator.is_main_process:
        mean_refs = sum(len(e.references) for e, _ in todo) / len(todo)
        vfm_dim = 0 if settings.store_images else encoders.vfm.dim
        sizes = estimate_sample_bytes(settings, mean_refs, encoders.text_encoder.dim, vfm_dim)
        per_clip = sum(sizes.values())
        free = shutil.disk_usage(cache_dir).free
        logger.info("feature cache %s: %d of %d clips to encode, about %.1f MB each (%s) = %.2f GB; %.1f GB free",
                    cache_dir, len(todo), len(entries), per_clip / 1e6,
                    ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in sizes.items()), per_clip * len(todo) / 1e9,
                    free / 1e9)
        if per_clip * len(todo) > free:
            logger.warning("the feature cache may not fit on the disk of %s", cache_dir)
    if todo:
        build_cache(entries, cache_dir, settings, encoders, accelerator.process_index, accelerator.num_processes,
                    progress=accelerator.is_local_main_process)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_index(entries, cache_dir)
    accelerator.wait_for_everyone()
    return FeatureCache(cache_dir)


def build_module(config: TrainingConfig, vfm_dim: int, vfm=None) -> RefAlignTrainingModule:
    """The DiT (with LoRA adapters and low-precision base weights when asked) and the projectors."""
    torch.manual_seed(config.seed)
    m, t = config.model, config.train
    base_dtype = WEIGHT_DTYPES.get(config.memory.base_weights)
    if m.dit == "tiny":
        from ..toy.tiny import tiny_dit
        dit = tiny_dit(config.seed, **(m.dit_config or {}))
        if base_dtype is not None:
            apply_layerwise_casting(dit, base_dtype, torch.float32)
    else:
        dit = load_dit(m.dit, weight_dtype=base_dtype)
    dit.train()
    projectors = None
    if config.alignment.enabled:
        a = config.alignment
        blocks = a.blocks or default_aligned_blocks(dit.config.num_layers)  # checked by `check_model`
        projectors = AlignmentProjectors(dit.config.num_attention_heads * dit.config.attention_head_dim, vfm_dim,
                                         blocks)
        if a.init_projectors:  # stage 2 starts from the stage-1 projectors
            tensors, _ = read_safetensors(a.init_projectors, "alignment.init_projectors")
            try:
                projectors.load_state_dict(tensors, strict=True)
            except RuntimeError as e:
                raise RefAlignInputError(f"alignment.init_projectors {a.init_projectors} does not fit this DiT, "
                                         f"VFM and blocks: {e}") from e
    if t.mode == "lora":
        from peft import LoraConfig
        dit.requires_grad_(False)
        dit.add_adapter(LoraConfig(r=t.lora_rank, lora_alpha=t.lora_alpha, target_modules=LORA_TARGETS,
                                   init_lora_weights=True))
        for name, param in dit.named_parameters():
            if "lora_" in name:  # trained in fp32 over any base storage
                param.data = param.data.float()
    else:
        dit.requires_grad_(True)
    if config.memory.gradient_checkpointing:
        dit.enable_gradient_checkpointing()
    a = config.alignment
    return RefAlignTrainingModule(dit, projectors, ra_weight=a.weight, shift=config.shift, pos_margin=a.pos_margin,
                                  neg_margin=a.neg_margin, neg_weight=a.neg_weight,
                                  vfm=vfm if a.vfm_online else None, loss_weighting=config.train.loss_weighting)


def export(state: dict[str, torch.Tensor], dit_config, output_dir: Path, config: TrainingConfig) -> dict[str, Path]:
    """Write the trained weights from a full (gathered) state dict of the training module."""
    files = {}
    dit_state = {k[len("dit."):]: v for k, v in state.items() if k.startswith("dit.")}
    if config.train.mode == "lora":
        files["lora"] = output_dir / "lora.safetensors"
        write_safetensors(lora_state_dict_for_comfyui(dit_state, config.train.lora_alpha), files["lora"])
    else:
        files["dit"] = output_dir / "dit.safetensors"
        meta = {"num_attention_heads": dit_config.num_attention_heads, "eps": dit_config.eps}
        write_safetensors({diffusers_to_original_key(k): v for k, v in dit_state.items()}, files["dit"],
                          {CONFIG_METADATA_KEY: json.dumps(meta)})
    projectors = {k[len("projectors."):]: v for k, v in state.items() if k.startswith("projectors.")}
    if projectors:
        files["projectors"] = output_dir / "projectors.safetensors"
        blocks = sorted({int(k.split(".")[1]) for k in projectors})
        write_safetensors(projectors, files["projectors"], {"blocks": json.dumps(blocks)})
    return files


class TrainingLog:
    """log.csv: one row per step; a resumed run first drops the rows past its checkpoint."""

    def __init__(self, path: Path, start: int, main: bool):
        self.path, self.main = path, main
        if main:
            drop_rows_after(path, start, LOG_COLUMNS)

    def write(self, values: dict) -> None:
        if self.main:
            with self.path.open("a") as f:
                f.write(",".join("" if values.get(k) is None else f"{values[k]:.6g}" if isinstance(values[k], float)
                                 else str(values[k]) for k in LOG_COLUMNS) + "\n")


def plot_log(csv_path: Path, png_path: Path, identity_csv: Path | None = None) -> None:
    """Loss terms (with an exponential moving average), learning rate and, with previews, identity per subject."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(csv.DictReader(csv_path.open()))
    if not rows:
        return
    identity = read_identity_log(identity_csv) if identity_csv is not None else {}
    panels = [["fm"], ["ra_pos", "ra_neg"], ["lr"]] + ([["identity"]] if identity else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(4.3 * len(panels), 3.5))
    for ax, keys in zip(axes, panels):
        if keys == ["identity"]:
            for name, points in identity.items():
                ax.plot(*zip(*points), marker="o", label=name)
            ax.set_title("preview identity (Identity Check)", fontsize=9)
        for key in keys if keys != ["identity"] else []:
            points = [(int(r["step"]), float(r[key])) for r in rows if r[key] != ""]
            if not points:
                continue
            steps, values = zip(*points)
            line, = ax.plot(steps, values, alpha=0.35 if key != "lr" else 1.0, label=key)
            if key != "lr":  # per-step values are noisy (random t, dropout)
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


def _make_accelerator(config: TrainingConfig):
    """The Accelerator for this launch (one process, or torchrun / `accelerate launch` with DDP, FSDP or DeepSpeed).

    On a machine without an accelerator two things are set by hand, because accelerate would otherwise run each
    process alone (no `cpu=True`: DistributedType.NO) or silently replace FSDP by DDP (it turns FSDP on only for
    GPU-like process groups): the CPU process group (gloo), and the launcher's FSDP config. FSDP2 itself runs on
    gloo."""
    from accelerate import Accelerator
    from accelerate.state import PartialState
    from accelerate.utils import FullyShardedDataParallelPlugin, InitProcessGroupKwargs

    on_cpu = not torch.accelerator.is_available()
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    group = InitProcessGroupKwargs(timeout=timedelta(hours=4), **({"backend": "gloo"} if on_cpu and deepspeed else {}))
    # a generous collective timeout: processes wait for each other while the feature cache is built
    accelerator = Accelerator(cpu=on_cpu and not deepspeed, mixed_precision=config.train.mixed_precision,
                              gradient_accumulation_steps=config.train.grad_accum,
                              step_scheduler_with_optimizer=False, kwargs_handlers=[group])
    if on_cpu and fsdp and accelerator.distributed_type == DistributedType.MULTI_CPU:
        accelerator.state.distributed_type = DistributedType.FSDP
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin()  # FSDP_* from the launcher's config
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        # what accelerate would otherwise fill in: the batch from a DataLoader we do not prepare, and clipping at 1.0
        # (the release clips nothing; DeepSpeed clips inside its engine, 0 = off)
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = config.train.batch_size
        ds["gradient_accumulation_steps"] = config.train.grad_accum
        ds["gradient_clipping"] = config.train.max_grad_norm or 0.0
        if ds.get("zero_optimization", {}).get("stage") == 3:  # the export gathers the whole model
            ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
    return accelerator


def _prepare(accelerator, module, config: TrainingConfig):
    """(module, optimizer, scheduler), prepared. The optimizer is built from the prepared model's parameters
    (FSDP1 flattens them), except where the library takes model and optimizer in one call and swaps the parameters
    itself: DeepSpeed (its engine) and FSDP2 (its sharded DTensors)."""
    from diffusers.optimization import get_scheduler

    def optimizer_for(parameters):
        t = config.train
        optimizer = torch.optim.AdamW([p for p in parameters if p.requires_grad], lr=t.lr, betas=(0.9, 0.999),
                                      eps=1e-8, weight_decay=t.weight_decay)
        return optimizer, get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=t.warmup_steps)

    if accelerator.distributed_type == DistributedType.DEEPSPEED or accelerator.is_fsdp2:
        optimizer, scheduler = optimizer_for(module.parameters())
        return accelerator.prepare(module, optimizer, scheduler)
    module = accelerator.prepare(module)
    optimizer, scheduler = optimizer_for(module.parameters())
    optimizer, scheduler = accelerator.prepare(optimizer, scheduler)
    return module, optimizer, scheduler


def _check_resume(saved: dict, config: TrainingConfig) -> None:
    """Refuse to resume when the config changed what the checkpoint depends on (model, data, alignment, mode, seed,
    ...); what may change (max_steps, checkpointing, lr, previews, workers) is logged."""
    allowed, refused = resume_differences(saved["config"], config.to_dict())
    if refused:
        raise RefAlignInputError(f"--resume: the config differs from the checkpoint's in {', '.join(refused)}; "
                                 "resume with the same settings, or start a new output folder")
    if allowed:
        logger.info("resuming with changed %s", ", ".join(allowed))


def _set_learning_rate(optimizer, scheduler, lr: float) -> None:
    """A changed train.lr on resume: the restored scheduler holds the old base lr."""
    lambda_lr = scheduler.scheduler
    factor = lambda_lr.lr_lambdas[0](lambda_lr.last_epoch)
    lambda_lr.base_lrs = [lr] * len(optimizer.param_groups)
    for group in optimizer.param_groups:
        group["initial_lr"], group["lr"] = lr, lr * factor
    lambda_lr._last_lr = [group["lr"] for group in optimizer.param_groups]


def check_inputs(config: TrainingConfig, output_dir: Path) -> None:
    """Every file the run will need exists and the output folder can be written, before hours of caching."""
    named = {"model.dit": config.model.dit, "model.vae": config.model.vae,
             "model.text_encoder": config.model.text_encoder,
             "alignment.init_projectors": config.alignment.init_projectors}
    if config.model.vfm != "efficientnet-lite0":
        named["model.vfm"] = config.model.vfm
    for key, value in named.items():
        if value not in (None, "tiny") and not Path(value).exists():
            raise RefAlignInputError(f"{key}: {value} does not exist")
    for i, source in enumerate(config.data.datasets):
        for key in ("path", "videos", "backgrounds"):
            value = getattr(source, key)
            if value is not None and not Path(value).exists():
                raise RefAlignInputError(f"data.datasets[{i}].{key}: {value} does not exist")
    needed = ["matplotlib"] + (["peft"] if config.train.mode == "lora" else [])  # imported late: checked first
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        raise RefAlignInputError(f"training needs the train extra ({', '.join(missing)} not installed): "
                                 "pip install 'refalign[train]'")
    check_output_folder(output_dir, "--output-dir")
    if config.data.cache_dir is not None:
        check_output_folder(Path(config.data.cache_dir), "data.cache_dir")


def check_model(config: TrainingConfig, vfm_dim: int | None) -> None:
    """The DiT's architecture against the config (`model.dit_config`, `alignment.blocks`, `alignment.
    init_projectors`), from the files' headers: before the feature cache is built. `vfm_dim`: the VFM's width
    (needed only with init_projectors)."""
    m, a = config.model, config.alignment
    if m.dit == "tiny":
        from ..toy.tiny import TINY_DIT
        try:
            with torch.device("meta"):
                dit_config = dict(RefAlignTransformer3DModel(**{**TINY_DIT, **(m.dit_config or {})}).config)
        except (TypeError, ValueError, RuntimeError) as e:
            raise RefAlignInputError(f"model.dit_config {m.dit_config}: not a valid tiny DiT config: {e}") from e
    else:
        dit_config = validated_original(*read_safetensors_shapes(m.dit, "model.dit"), path=f"model.dit {m.dit}")[1]
    if not a.enabled:
        return
    layers = dit_config["num_layers"]
    blocks = a.blocks or default_aligned_blocks(layers)
    if max(blocks) >= layers:
        raise RefAlignInputError(f"alignment.blocks {blocks}: the DiT has {layers} blocks (0–{layers - 1})")
    if a.init_projectors:
        with torch.device("meta"):
            width = dit_config["num_attention_heads"] * dit_config["attention_head_dim"]
            expected = AlignmentProjectors(width, vfm_dim, blocks).state_dict()
        stored, _ = read_safetensors_shapes(a.init_projectors, "alignment.init_projectors")
        differs = sorted(k for k in expected.keys() | stored.keys()
                         if k not in expected or k not in stored or expected[k].shape != stored[k].shape)
        if differs:
            raise RefAlignInputError(f"alignment.init_projectors {a.init_projectors} does not fit this DiT, VFM "
                                     f"({vfm_dim} wide) and blocks {blocks}: {differs[:5]} differ")


def train(config: TrainingConfig, output_dir, resume: bool = False, cache_only: bool = False) -> TrainingResult:
    """Train (or, with `resume`, continue from the newest readable checkpoint in `output_dir`). Every check runs
    first; the output folder is locked against a second run for the whole run."""
    config = config.validated()
    output_dir = Path(output_dir)
    check_inputs(config, output_dir)
    prompts = read_sample_prompts(config.previews.prompts, config.previews.shift or config.shift) \
        if config.previews.prompts else None
    output_dir.mkdir(parents=True, exist_ok=True)
    # a lock per process rank: the processes of one launch do not block each other, a second launch is refused
    with OutputLock(output_dir, "--output-dir", folder=True, name=f".lock-rank{os.environ.get('RANK', '0')}"):
        resume_from = newest_checkpoint(output_dir) if resume else None
        if resume_from is not None:
            _check_resume(resume_from[1], config)
        elif not resume and complete_checkpoints(output_dir / "checkpoints"):
            raise RefAlignInputError(f"{output_dir} already holds checkpoints: pass --resume to continue, or use "
                                     "another output folder")
        elif resume:
            logger.warning("--resume: %s holds no checkpoint yet; starting at step 0", output_dir)
        return _train(config, output_dir, resume_from, prompts, cache_only)


def _train(config: TrainingConfig, output_dir: Path, resume_from: tuple[Path, dict] | None, prompts,
           cache_only: bool) -> TrainingResult:
    from diffusers.training_utils import EMAModel
    from tqdm import tqdm

    t = config.train
    accelerator = _make_accelerator(config)
    main = accelerator.is_main_process
    if main:
        logger.info("training: %s on %d processes, device %s", accelerator.distributed_type.value,
                    accelerator.num_processes, accelerator.device)
    encoders = Encoders(config, accelerator.device)
    check_model(config, encoders.vfm.dim if config.alignment.enabled and config.alignment.init_projectors else None)

    cache = prepare_cache(config, output_dir, accelerator, encoders)
    if cache_only:
        return TrainingResult(output_dir, 0, {"cache": cache.dir})
    vfm = encoders.vfm if config.alignment.vfm_online else None
    module = build_module(config, vfm.dim if vfm is not None else cache.vfm_dim, vfm)
    dit_config = module.dit.config
    module, optimizer, scheduler = _prepare(accelerator, module, config)
    params = [p for p in module.parameters() if p.requires_grad]
    if t.ema_decay and any(p.numel() == 0 for p in params):
        raise RefAlignInputError("train.ema_decay: EMA needs each process to hold its parameters (not DeepSpeed "
                                 "ZeRO-3); use ZeRO-2 or FSDP")
    ema = EMAModel(params, decay=t.ema_decay) if t.ema_decay else None  # exported instead of the raw weights
    checkpoints = Checkpoints(accelerator, output_dir, module, ema, t.keep_last)
    start = 0
    if resume_from is not None:
        folder, saved = resume_from
        checkpoints.load(folder)
        start = saved["step"]
        if saved["config"]["train"]["lr"] != t.lr:
            _set_learning_rate(optimizer, scheduler, t.lr)

    previews = None
    if prompts is not None:
        inputs = output_dir / "previews" / "inputs.safetensors"
        if main:
            encode_preview_inputs(prompts, encoders, inputs)
        accelerator.wait_for_everyone()
        previews = Previews(prompts, inputs, output_dir / "previews", encoders, main)
        previews.truncate(start)
    text_length = config.text_length or encoders.text_encoder.length
    encoders.release_text_encoder()

    rank, world = accelerator.process_index, accelerator.num_processes
    sampler = BucketBatchSampler(cache.batch_groups(config.data.buckets.by_references), cache.repeats, t.batch_size,
                                 config.seed, rank, world,
                                 start=start * t.grad_accum)
    loader = torch.utils.data.DataLoader(cache, batch_sampler=sampler, collate_fn=list,
                                         num_workers=config.data.num_workers,
                                         persistent_workers=config.data.num_workers > 0)
    batches = iter(loader)
    log = TrainingLog(output_dir / "log.csv", start, main)
    unwrapped = accelerator.unwrap_model(module)
    sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)

    def preview(step: int) -> None:
        if previews is None or not (main or sharded):
            return
        if ema is not None:
            ema.store(params)
            ema.copy_to(params)
        previews.run(step, unwrapped.dit, accelerator.autocast)
        if ema is not None:
            ema.restore(params)

    if config.previews.at_start and start == 0:
        preview(0)
    bar = tqdm(total=t.max_steps, initial=start, desc="training", disable=not main)
    for step in range(start, t.max_steps):
        began = time.perf_counter()
        for micro in range(t.grad_accum):
            generator = step_generator(config.seed, step, rank, micro)
            batch = make_training_batch(next(batches), cache.null_prompt, generator, config.dropout.text,
                                        config.dropout.references, config.dropout.both, text_length)
            with accelerator.accumulate(module):
                losses = module(batch)
                accelerator.backward(losses.total)
                if accelerator.sync_gradients and t.max_grad_norm:
                    accelerator.clip_grad_norm_(params, t.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
        if ema is not None:
            ema.step(params)
        scheduler.step()
        kept = batch.keep_references > 0  # RA terms are blank where the references were dropped
        several = bool((kept & (batch.num_references > 1)).any())
        log.write({"step": step + 1, "loss": losses.total.item(), "fm": losses.fm.item(),
                   "ra_pos": losses.ra_positive.item() if bool(kept.any()) else None,
                   "ra_neg": losses.ra_negative.item() if several else None, "ra_gated": losses.ra_gated.item(),
                   "lr": scheduler.get_last_lr()[0], "timestep": losses.timestep.float().mean().item(),
                   "batch": len(batch.latents), "seconds": time.perf_counter() - began})
        bar.update(1)
        bar.set_postfix(fm=f"{losses.fm.item():.3f}")
        done = step + 1
        if previews is not None and (done % config.previews.every == 0 or done == t.max_steps):
            preview(done)
        if done % t.checkpoint_every == 0 or done == t.max_steps:
            checkpoints.save(done, config.to_dict())
            if main:
                print(f"saved checkpoint step {done}", flush=True)
    bar.close()

    if ema is not None:
        ema.copy_to(params)
    state = accelerator.get_state_dict(module)  # gathered on the main process (a collective when sharded)
    files = {}
    if main:
        files = export(state, dit_config, output_dir, config)
        files["log"] = output_dir / "log.csv"
        plot_log(files["log"], output_dir / "loss.png",
                 previews.scores_path if previews is not None else None)
        print(f"exported to {output_dir}", flush=True)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return TrainingResult(output_dir, t.max_steps, files)
