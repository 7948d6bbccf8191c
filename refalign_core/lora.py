"""LoRA in ComfyUI's LoraLoader format (what `train/train.py` exports): `diffusion_model.<original Wan name>` +
`.lora_down.weight` (A, `[r, in]`), `.lora_up.weight` (B, `[out, r]`), optional `.alpha`; merged as
W + strength·(alpha / r)·B·A, the way ComfyUI applies it."""

import torch

from .errors import RefAlignInputError

LORA_PREFIX = "diffusion_model."


def merge_lora(state_dict: dict[str, torch.Tensor], lora: dict[str, torch.Tensor], strength: float = 1.0,
               name: str = "LoRA") -> dict[str, torch.Tensor]:
    """Original-named DiT weights with the LoRA merged in (a new dict; merged in fp32, stored in each weight's
    dtype). A LoRA module with no matching weight, or of the wrong shape, is refused naming `name`."""
    merged = dict(state_dict)
    downs = [k for k in lora if k.endswith(".lora_down.weight")]
    if not downs:
        raise RefAlignInputError(f"{name}: no '*.lora_down.weight' keys: not a LoRA in ComfyUI's format")
    for down_key in downs:
        module = down_key[: -len(".lora_down.weight")]
        target = module[len(LORA_PREFIX):] if module.startswith(LORA_PREFIX) else module
        weight = merged.get(target + ".weight")
        down, up = lora[down_key].float(), lora.get(module + ".lora_up.weight")
        if weight is None or up is None:
            raise RefAlignInputError(f"{name}: {module} has no matching DiT weight or no lora_up (wrong base model?)")
        rank = down.shape[0]
        alpha = float(lora[module + ".alpha"]) if module + ".alpha" in lora else rank
        delta = (up.float() @ down) * (strength * alpha / rank)
        if delta.shape != weight.shape:
            raise RefAlignInputError(f"{name}: {module} is {tuple(delta.shape)}, the DiT weight is "
                                     f"{tuple(weight.shape)} (wrong base model?)")
        merged[target + ".weight"] = (weight.float() + delta).to(weight.dtype)
    return merged
