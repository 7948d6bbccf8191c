"""`train(config, output_dir)`: RefAlign training, from one CPU process to many GPUs (accelerate: DDP, FSDP,
DeepSpeed).

Outputs in `output_dir`: `dit.safetensors` (original Wan2.1 names: our loader and ComfyUI's diffusion-model loader
read it) or `lora.safetensors` (ComfyUI LoraLoader keys) in LoRA mode; `projectors.safetensors`;
`checkpoints/step-N/`; `log.csv`; `loss.png`; `previews/` when sample prompts are given."""

import contextlib
import dataclasses
import functools
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate.utils import DistributedType

from ..files import OutputLock
from ..models.text_encoder import WAN_NEGATIVE_PROMPT, encode_prompts
from .buckets import BucketBatchSampler
from .cache import prepare_cache
from .checkpoints import Checkpoints
from .checks import check_inputs, resume_point
from .config import TrainingConfig
from .distributed import make_accelerator, prepare, set_learning_rate
from .export import export
from .logs import TrainingLog, plot_log
from .model_build import Encoders, build_module, check_model, make_ema
from .module import make_training_batch
from .previews import Previews, encode_preview_inputs, read_sample_prompts

logger = logging.getLogger("refalign.train")


@dataclass
class TrainingResult:
    output_dir: Path
    step: int
    files: dict[str, Path]


def step_generator(seed: int, step: int, rank: int, micro: int = 0) -> torch.Generator:
    """All randomness of one micro-step (dropout, augmentation copy, timestep, noise) comes from this: a resumed
    run draws exactly what the uninterrupted run drew, with no RNG state to save."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 4096 + rank) * 64 + micro)


def _loader(cache, config: TrainingConfig, accelerator, start: int):
    """This process's batches of cached clips, from step `start` on (one bucket per batch)."""
    sampler = BucketBatchSampler(cache.batch_groups(config.data.buckets.by_references), cache.repeats,
                                 config.train.batch_size, config.seed, accelerator.process_index,
                                 accelerator.num_processes, start=start * config.train.grad_accum)
    return torch.utils.data.DataLoader(cache, batch_sampler=sampler, collate_fn=list,
                                       num_workers=config.data.num_workers,
                                       persistent_workers=config.data.num_workers > 0)


def _resume(resume_from: tuple[Path, dict] | None, checkpoints, optimizer, scheduler, lr: float) -> int:
    """Load the checkpoint to resume from (taking a changed learning rate); the step to start at."""
    if resume_from is None:
        return 0
    folder, saved = resume_from
    checkpoints.load(folder)
    if saved["config"]["train"]["lr"] != lr:
        set_learning_rate(optimizer, scheduler, lr)
    return saved["step"]


def _sample_prompts(config: TrainingConfig) -> list | None:
    """The previews' sample prompts (None: no previews); distilling, each is sampled as the student is."""
    if not config.previews.prompts:
        return None
    prompts = read_sample_prompts(config.previews.prompts, config.previews.shift or config.shift)
    if config.distill.enabled:
        prompts = [dataclasses.replace(p, settings=config.distill.student(p.settings)) for p in prompts]
    return prompts


def _open_previews(prompts, encoders, output_dir: Path, accelerator, start: int) -> Previews | None:
    """The previews of the sample prompts (their inputs encoded once, by the main process), or None."""
    if prompts is None:
        return None
    inputs = output_dir / "previews" / "inputs.safetensors"
    if accelerator.is_main_process:
        encode_preview_inputs(prompts, encoders, inputs)
    accelerator.wait_for_everyone()
    previews = Previews(prompts, inputs, output_dir / "previews", encoders, accelerator.is_main_process)
    previews.truncate(start)
    return previews


@contextlib.contextmanager
def _ema_weights(ema, params):
    """The EMA weights in place of the trained ones inside the block (as they are without EMA)."""
    if ema is None:
        yield
        return
    ema.store(params)
    ema.copy_to(params)
    try:
        yield
    finally:
        ema.restore(params)


def _preview(previews: Previews | None, step: int, accelerator, module, ema, params) -> None:
    """Previews at `step`, with the EMA weights; every process takes part when the model is sharded."""
    sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    if previews is None or not (accelerator.is_main_process or sharded):
        return
    with _ema_weights(ema, params):
        previews.run(step, accelerator.unwrap_model(module).dit, accelerator.autocast)


def teacher_negative(config: TrainingConfig, text_encoder, text_length: int) -> torch.Tensor | None:
    """The distillation teacher's negative prompt embeddings `[1, L, D]` (None when not distilling)."""
    if not config.distill.enabled:
        return None
    negative = config.distill.negative_prompt
    return encode_prompts(text_encoder, [WAN_NEGATIVE_PROMPT if negative is None else negative], text_length)


def train(config: TrainingConfig, output_dir, resume: bool = False, cache_only: bool = False) -> TrainingResult:
    """Train (or, with `resume`, continue from the newest readable checkpoint in `output_dir`). Every check runs
    first; the output folder is locked against a second run for the whole run.

    One function on purpose (about 80 lines): the run reads top to bottom, set-up, models, data, loop, export."""
    from tqdm import tqdm

    config, output_dir = config.validated(), Path(output_dir)
    check_inputs(config, output_dir)
    prompts = _sample_prompts(config)
    output_dir.mkdir(parents=True, exist_ok=True)
    # a lock per process rank: the processes of one launch do not block each other, a second launch is refused
    with OutputLock(output_dir, "--output-dir", folder=True, name=f".lock-rank{os.environ.get('RANK', '0')}"):
        resume_from = resume_point(output_dir, config, resume)
        accelerator = make_accelerator(config)
        t, main = config.train, accelerator.is_main_process
        if main:
            logger.info("training: %s on %d processes, device %s", accelerator.distributed_type.value,
                        accelerator.num_processes, accelerator.device)
        encoders = Encoders(config, accelerator.device)
        check_model(config, encoders.vfm.dim if config.alignment.enabled and config.alignment.init_projectors else None)

        # data: every clip encoded once into the feature cache
        cache = prepare_cache(config, output_dir, accelerator, encoders)
        if cache_only:
            return TrainingResult(output_dir, 0, {"cache": cache.dir})

        # model: DiT + projectors (+ LoRA), optimizer, EMA, checkpoints
        vfm = encoders.vfm if config.alignment.vfm_online else None
        text_length = config.text_length or encoders.text_encoder.length
        module = build_module(config, vfm.dim if vfm is not None else cache.vfm_dim, vfm,
                              negative=teacher_negative(config, encoders.text_encoder, text_length))
        dit_config, terms, panels = module.dit.config, module.LOG_TERMS, module.PLOT_PANELS
        module, optimizer, scheduler = prepare(accelerator, module, config)
        params = [p for p in module.parameters() if p.requires_grad]
        ema = make_ema(params, t.ema_decay)  # exported instead of the raw weights
        checkpoints = Checkpoints(accelerator, output_dir, module, ema, t.keep_last)
        start = _resume(resume_from, checkpoints, optimizer, scheduler, t.lr)
        previews = _open_previews(prompts, encoders, output_dir, accelerator, start)
        make_batch = functools.partial(make_training_batch, null_prompt=cache.null_prompt,
                                       text_dropout=config.dropout.text, reference_dropout=config.dropout.references,
                                       both_dropout=config.dropout.both,
                                       text_length=text_length)
        encoders.release_text_encoder()
        batches = iter(_loader(cache, config, accelerator, start))
        log = TrainingLog(output_dir / "log.csv", start, main, terms)

        # loop: L = L_FM + λ·g(t)·L_RA (or, distilling, the student's distance to the teacher), accumulated over
        # train.grad_accum micro-batches
        if config.previews.at_start and start == 0:
            _preview(previews, 0, accelerator, module, ema, params)
        bar = tqdm(total=t.max_steps, initial=start, desc="training", disable=not main)
        for step in range(start, t.max_steps):
            began = time.perf_counter()
            for micro in range(t.grad_accum):
                batch = make_batch(next(batches), step=step,
                                   generator=step_generator(config.seed, step, accelerator.process_index, micro))
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
            done = step + 1
            log.write(done, losses, batch, scheduler.get_last_lr()[0], began)
            bar.update(1)
            bar.set_postfix(loss=f"{losses.total.item():.3f}")
            if previews is not None and (done % config.previews.every == 0 or done == t.max_steps):
                _preview(previews, done, accelerator, module, ema, params)
            if done % t.checkpoint_every == 0 or done == t.max_steps:
                checkpoints.save(done, config.to_dict())
                if main:
                    print(f"saved checkpoint step {done}", flush=True)
        bar.close()

        # export: the EMA weights when there are any, gathered on the main process (a collective when sharded)
        if ema is not None:
            ema.copy_to(params)
        state = accelerator.get_state_dict(module)
        files = {}
        if main:
            files = export(state, dit_config, output_dir, config) | {"log": log.path}
            plot_log(log.path, output_dir / "loss.png", panels, previews.scores_path if previews is not None else None)
            print(f"exported to {output_dir}", flush=True)
        accelerator.wait_for_everyone()
        accelerator.end_training()
        return TrainingResult(output_dir, t.max_steps, files)
