"""Training checkpoints through accelerate's `save_state` / `load_state`, so a run resumes the same way in one
process, under DDP, FSDP and DeepSpeed (each saves its model and optimizer state its own way, sharded where the
model is). Our own pieces ride along in accelerate's state hooks, written as safetensors / JSON (accelerate's
`register_for_checkpointing` unpickles on load, which we never do):

  trainable.safetensors   one process, DDP: only the trainable weights (a LoRA run does not store the frozen base)
  ema.safetensors         the EMA weights, whole (gathered from the shards when the model is sharded)
  training_state.json     step, world size and the run's config (written last: its presence marks a whole
                          checkpoint)

A checkpoint is written into `step-N.tmp/` and renamed when complete; the newest `train.keep_last` are kept."""

import csv
import json
import logging
import os
import shutil
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..errors import RefAlignInputError
from ..models.safetensors_io import read_safetensors, write_safetensors

logger = logging.getLogger(__name__)
STATE_FILE = "training_state.json"


def complete_checkpoints(folder: Path) -> list[Path]:
    """Whole checkpoints in `folder`, oldest first."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("step-*") if not p.name.endswith(".tmp") and (p / STATE_FILE).is_file())


def unreadable(folder: Path) -> str | None:
    """Why a checkpoint cannot be resumed from (unreadable state, a truncated or empty file), or None. torch's
    `.bin` files are zip archives: every member's CRC is checked, so a cut file is found here, not mid-load."""
    file = folder / STATE_FILE
    try:
        json.loads(file.read_text())["step"]
        for file in sorted(folder.rglob("*.safetensors")):
            with safe_open(str(file), framework="pt") as f:  # checks the header against the file's length
                f.keys()
        for file in sorted(folder.rglob("*.bin")):
            with zipfile.ZipFile(file) as archive:
                if archive.testzip() is not None:
                    return f"{file.name} is corrupt"
        for file in sorted(folder.rglob("*.pkl")):
            if file.stat().st_size == 0:
                return f"{file.name} is empty"
    except (OSError, ValueError, KeyError, SafetensorError, zipfile.BadZipFile, EOFError) as e:
        return f"{file.name}: {e}"
    return None


def newest_checkpoint(output_dir: Path) -> tuple[Path, dict] | None:
    """The newest checkpoint in `output_dir/checkpoints` that can be resumed from, with its training state (older
    ones are tried when the newest is unreadable, with a warning); None when there is no checkpoint. Raises
    RefAlignInputError naming each checkpoint and its fault when there are checkpoints but none is readable: a
    resume never silently starts over."""
    found = complete_checkpoints(Path(output_dir) / "checkpoints")
    faults = []
    for folder in reversed(found):
        why = unreadable(folder)
        if why is None:
            return folder, json.loads((folder / STATE_FILE).read_text())
        logger.warning("checkpoint %s cannot be resumed from (%s); trying the one before", folder, why)
        faults.append(f"{folder.name}: {why}")
    if faults:
        raise RefAlignInputError(f"--resume: no checkpoint in {Path(output_dir) / 'checkpoints'} can be read "
                                 f"({'; '.join(faults)}); restore one, or start a new output folder")
    return None


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """A whole tensor from an FSDP2 shard (a collective: every process calls it)."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor.detach()


def _like(full: torch.Tensor, shard: torch.Tensor) -> torch.Tensor:
    """`full` cut the way `shard` is (this process's FSDP2 shard of it), else `full`."""
    if hasattr(shard, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor
        return distribute_tensor(full.to(shard.dtype), shard.device_mesh, shard.placements, src_data_rank=None)
    return full.to(shard.device, shard.dtype)


def drop_rows_after(path: Path, step: int, columns: list[str]) -> None:
    """Bring a step-indexed CSV log back to checkpoint `step`: the header `columns`, then the whole rows of steps
    ≤ `step`. Rows logged after the checkpoint (a resumed run logs them again) and a row cut by a kill are dropped; a
    file written with other columns keeps its rows, under the columns of the same name. Replaced atomically."""
    lines = path.read_text().split("\n") if path.is_file() else [""]
    header = lines[0].split(",")
    kept = [fields for fields in csv.reader(lines[1:-1])  # [-1]: after the last newline, cut or ""
            if len(fields) == len(header) and fields[0].isdigit() and int(fields[0]) <= step]
    if header != columns:
        kept = [[dict(zip(header, fields)).get(c, "") for c in columns] for fields in kept]
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows([columns] + kept)
    os.replace(tmp, path)


class Checkpoints:
    def __init__(self, accelerator, output_dir: Path, module, ema=None, keep_last: int | None = None):
        self.accelerator, self.module, self.ema, self.keep_last = accelerator, module, ema, keep_last
        self.folder = Path(output_dir) / "checkpoints"
        self.state: dict = {}
        accelerator.register_save_state_pre_hook(self._save_hook)
        accelerator.register_load_state_pre_hook(self._load_hook)

    def _trainable(self) -> dict[str, torch.nn.Parameter]:
        module = self.accelerator.unwrap_model(self.module)
        return {k: p for k, p in module.named_parameters() if p.requires_grad}

    def _save_hook(self, models, weights, output_dir) -> None:
        folder = Path(output_dir)
        if weights:  # not sharded: store the trainable weights only, instead of accelerate's whole-model file
            names = set(self._trainable())
            if self.accelerator.is_main_process:
                write_safetensors({k: v for k, v in weights[0].items() if k in names or
                                   k.removeprefix("module.") in names}, folder / "trainable.safetensors")
            weights.clear()
        if self.ema is not None:
            tensors = {n: _full(p) for n, p in zip(self._trainable(), self.ema.shadow_params)}
            scalars = {k: v for k, v in self.ema.state_dict().items() if k != "shadow_params"}
            if self.accelerator.is_main_process:
                write_safetensors(tensors, folder / "ema.safetensors", {"ema": json.dumps(scalars)})

    def _load_hook(self, models, input_dir) -> None:
        folder = Path(input_dir)
        if models:  # not sharded: our trainable-weights file instead of accelerate's model file
            tensors, _ = read_safetensors(folder / "trainable.safetensors", f"checkpoint {folder}")
            params = self._trainable()
            tensors = {k.removeprefix("module."): v for k, v in tensors.items()}
            missing = sorted(set(params) - set(tensors))
            if missing:
                raise RefAlignInputError(f"checkpoint {folder} lacks trainable weights {missing[:5]} (another "
                                         "model, LoRA setting or alignment setting?)")
            with torch.no_grad():
                for name, param in params.items():
                    param.copy_(tensors[name])
            models.clear()
        if self.ema is not None:
            tensors, metadata = read_safetensors(folder / "ema.safetensors", f"checkpoint {folder} EMA")
            missing = sorted(set(self._trainable()) - set(tensors))
            if missing or "ema" not in metadata:
                raise RefAlignInputError(f"checkpoint {folder} has no whole EMA state (missing {missing[:5]})")
            shadows = [_like(tensors[name], shadow) for name, shadow in zip(self._trainable(), self.ema.shadow_params)]
            self.ema.load_state_dict({**json.loads(metadata["ema"]), "shadow_params": shadows})

    def save(self, step: int, config: dict) -> Path:
        """Every process calls this (sharded states are saved collectively)."""
        final = self.folder / f"step-{step:06d}"
        tmp = final.with_name(final.name + ".tmp")
        if self.accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.accelerator.wait_for_everyone()
        try:
            self.accelerator.save_state(str(tmp))
            self.accelerator.wait_for_everyone()
            if self.accelerator.is_main_process:
                state = {"step": step, "world_size": self.accelerator.num_processes,
                         "distributed_type": str(self.accelerator.distributed_type), "config": config}
                (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
                shutil.rmtree(final, ignore_errors=True)
                os.replace(tmp, final)
        except BaseException:  # a full disk, Ctrl-C: no half checkpoint stays behind
            if self.accelerator.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        if self.accelerator.is_main_process:
            self._prune()
        self.accelerator.wait_for_everyone()
        return final

    def _prune(self) -> None:
        if self.keep_last is None:
            return
        for old in complete_checkpoints(self.folder)[:-self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    def load(self, folder: Path) -> None:
        try:
            self.accelerator.load_state(str(folder))
        except (OSError, RuntimeError, EOFError, zipfile.BadZipFile) as e:
            raise RefAlignInputError(f"--resume: checkpoint {folder} cannot be loaded: {e}") from e
        logger.info("resumed from %s", folder)
