"""The trained weights, written from a full (gathered) state dict of the training module: `dit.safetensors`
(original Wan2.1 names) or, in LoRA mode, `lora.safetensors` (ComfyUI LoraLoader keys); `projectors.safetensors`."""

import json
from pathlib import Path

import torch

from ..inference.sampler import PRESETS
from ..models.checkpoint import CONFIG_METADATA_KEY, diffusers_to_original_key
from ..models.safetensors_io import write_safetensors
from .config import TrainingConfig
from .module import lora_state_dict_for_comfyui


def export(state: dict[str, torch.Tensor], dit_config, output_dir: Path, config: TrainingConfig) -> dict[str, Path]:
    """Write the trained weights; returns the files by kind ("dit" or "lora", "projectors")."""
    files = {}
    dit_state = {k[len("dit."):]: v for k, v in state.items() if k.startswith("dit.")}
    if config.train.mode == "lora":
        files["lora"] = output_dir / "lora.safetensors"
        d = config.distill
        # a distilled student says how to sample it (its steps at its shift) and, when that is the turbo preset, so
        meta = None
        if d.enabled:
            meta = {"refalign.distill": json.dumps(
                {"student_steps": d.student_steps, "shift": config.shift, "teacher_steps": d.teacher_steps,
                 "teacher_image_scale": d.teacher_image_scale, "teacher_text_scale": d.teacher_text_scale,
                 "regression_weight": d.regression_weight, "dmd_weight": d.dmd_weight})}
            if d.student_steps == PRESETS["turbo"]["steps"]:
                meta["refalign.preset"] = "turbo"
        write_safetensors(lora_state_dict_for_comfyui(dit_state, config.train.lora_alpha), files["lora"], meta)
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
