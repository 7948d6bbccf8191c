"""The accelerate set-up of a run: one process, or torchrun / `accelerate launch` with DDP, FSDP or DeepSpeed; the
optimizer and learning-rate schedule, prepared for it."""

import os
from datetime import timedelta

import torch
from accelerate.utils import DistributedType

from .config import TrainingConfig


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() == "true"


def make_accelerator(config: TrainingConfig):
    """The Accelerator for this launch. On a machine without an accelerator the process group is gloo (accelerate
    would otherwise run each process alone: no `cpu=True` gives DistributedType.NO) and a launch with FSDP gets FSDP
    (see `_fsdp_on_cpu`)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    on_cpu = not torch.accelerator.is_available()
    deepspeed = _env_flag("ACCELERATE_USE_DEEPSPEED")
    # a generous collective timeout: processes wait for each other while the feature cache is built
    group = InitProcessGroupKwargs(timeout=timedelta(hours=4), **({"backend": "gloo"} if on_cpu and deepspeed else {}))
    # distillation's fake-score-only steps leave the student's adapters without gradients; DDP must expect that
    ddp = DistributedDataParallelKwargs(find_unused_parameters=config.distill.enabled and
                                        config.distill.fake_score_updates > 1)
    accelerator = Accelerator(cpu=on_cpu and not deepspeed, mixed_precision=config.train.mixed_precision,
                              gradient_accumulation_steps=config.train.grad_accum,
                              step_scheduler_with_optimizer=False, kwargs_handlers=[group, ddp])
    if on_cpu and _env_flag("ACCELERATE_USE_FSDP") and accelerator.distributed_type == DistributedType.MULTI_CPU:
        _fsdp_on_cpu(accelerator)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        _configure_deepspeed(accelerator.state.deepspeed_plugin.deepspeed_config, config)
    return accelerator


def _fsdp_on_cpu(accelerator) -> None:
    """Turn a CPU launch that asked for FSDP (the launcher's FSDP_* config) into FSDP; FSDP2 itself runs on gloo.

    The one place that sets accelerate's state by hand, because there is no public switch: accelerate turns FSDP on
    only for GPU-like process groups and would silently run DDP instead. The distributed type is held twice, by the
    AcceleratorState and by the PartialState it was built on; both are set through their public attributes, as
    accelerate itself keeps them in step at the end of `AcceleratorState.__init__`."""
    from accelerate.state import PartialState
    from accelerate.utils import FullyShardedDataParallelPlugin

    accelerator.state.distributed_type = DistributedType.FSDP
    PartialState().distributed_type = DistributedType.FSDP  # the shared state, already initialised: no new set-up
    accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin()


def _configure_deepspeed(ds: dict, config: TrainingConfig) -> None:
    """What accelerate would otherwise fill in: the batch from a DataLoader we do not prepare, and clipping at 1.0
    (the release clips nothing; DeepSpeed clips inside its engine, 0 = off)."""
    ds["train_micro_batch_size_per_gpu"] = config.train.batch_size
    ds["gradient_accumulation_steps"] = config.train.grad_accum
    ds["gradient_clipping"] = config.train.max_grad_norm or 0.0
    if ds.get("zero_optimization", {}).get("stage") == 3:  # the export gathers the whole model
        ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True


def _optimizer(parameters, config: TrainingConfig):
    """AdamW over the trainable parameters, with a constant learning rate after a linear warm-up."""
    from diffusers.optimization import get_scheduler

    t = config.train
    optimizer = torch.optim.AdamW([p for p in parameters if p.requires_grad], lr=t.lr, betas=(0.9, 0.999), eps=1e-8,
                                  weight_decay=t.weight_decay)
    return optimizer, get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=t.warmup_steps)


def prepare(accelerator, module, config: TrainingConfig):
    """(module, optimizer, scheduler), prepared. The optimizer is built from the prepared model's parameters
    (FSDP1 flattens them), except where the library takes model and optimizer in one call and swaps the parameters
    itself: DeepSpeed (its engine) and FSDP2 (its sharded DTensors)."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED or accelerator.is_fsdp2:
        optimizer, scheduler = _optimizer(module.parameters(), config)
        return accelerator.prepare(module, optimizer, scheduler)
    module = accelerator.prepare(module)
    optimizer, scheduler = _optimizer(module.parameters(), config)
    optimizer, scheduler = accelerator.prepare(optimizer, scheduler)
    return module, optimizer, scheduler


def set_learning_rate(optimizer, scheduler, lr: float) -> None:
    """A changed train.lr on resume: the restored scheduler holds the old base lr. The scheduler's next step
    computes its own last lr from these."""
    lambda_lr = scheduler.scheduler
    factor = lambda_lr.lr_lambdas[0](lambda_lr.last_epoch)
    lambda_lr.base_lrs = [lr] * len(optimizer.param_groups)
    for group in optimizer.param_groups:
        group["initial_lr"], group["lr"] = lr, lr * factor
