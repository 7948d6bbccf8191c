"""What is checked before a run does any work: its input files, extras and output folders, and whether it may
resume from the checkpoints in its output folder."""

import importlib.util
import logging
from pathlib import Path

from ..errors import RefAlignInputError
from ..paths import check_output_folder
from .checkpoints import complete_checkpoints, newest_checkpoint
from .config import TrainingConfig, resume_differences

logger = logging.getLogger(__name__)


def check_inputs(config: TrainingConfig, output_dir: Path) -> None:
    """Every file the run will need is named and exists and the output folder can be written, before hours of
    caching."""
    m = config.model
    if m.dit is None and m.dit_config is None:
        raise RefAlignInputError("model.dit: required: a DiT .safetensors (Wan2.1-T2V / RefAlign), or "
                                 "model.dit_config for a DiT trained from random weights")
    for key, expected in (("vae", "a Wan2.1 VAE .safetensors"), ("text_encoder", "a umT5 folder")):
        if getattr(m, key) is None:
            raise RefAlignInputError(f"model.{key}: required: {expected}")
    named = {"model.dit": config.model.dit, "model.vae": config.model.vae,
             "model.text_encoder": config.model.text_encoder,
             "alignment.init_projectors": config.alignment.init_projectors}
    if config.model.vfm != "efficientnet-lite0":
        named["model.vfm"] = config.model.vfm
    for key, value in named.items():
        if value is not None and not Path(value).exists():
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


def resume_point(output_dir: Path, config: TrainingConfig, resume: bool) -> tuple[Path, dict] | None:
    """The checkpoint to resume from (folder, training state), or None to start at step 0. Refuses to resume when
    the config changed what the checkpoint depends on (model, data, alignment, mode, seed, ...; what may change,
    such as max_steps, checkpointing, lr, previews or workers, is logged), and a fresh run over checkpoints."""
    if not resume:
        if complete_checkpoints(output_dir / "checkpoints"):
            raise RefAlignInputError(f"{output_dir} already holds checkpoints: pass --resume to continue, or use "
                                     "another output folder")
        return None
    found = newest_checkpoint(output_dir)
    if found is None:
        logger.warning("--resume: %s holds no checkpoint yet; starting at step 0", output_dir)
        return None
    allowed, refused = resume_differences(found[1]["config"], config.to_dict())
    if refused:
        raise RefAlignInputError(f"--resume: the config differs from the checkpoint's in {', '.join(refused)}; "
                                 "resume with the same settings, or start a new output folder")
    if allowed:
        logger.info("resuming with changed %s", ", ".join(allowed))
    return found
