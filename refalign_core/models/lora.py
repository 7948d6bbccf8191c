"""LoRA for the core DiT, in the formats users have, applied with peft through diffusers.

Formats (detected from the keys):
* ComfyUI / original Wan names, what `train/train.py` exports: `diffusion_model.<name>.lora_down.weight` (A,
  `[r, in]`), `.lora_up.weight` (B, `[out, r]`), optional `.alpha`; also `lora_A` / `lora_B`, and the `.diff_b`
  bias deltas of the lightx2v / CausVid step-distill LoRAs. Converted by diffusers' Wan LoRA conversion.
* kohya / musubi-tuner: `lora_unet_<name with _>.lora_down.weight`; renamed to original names against this DiT's
  own module names, then converted as above.
* diffusers / peft: `[transformer.]blocks.0.attn1.to_q.lora_A.weight` (optionally `base_model.model.`).

The delta is W + strength·(alpha / r)·B·A (+ strength·diff_b on the bias), as ComfyUI applies it. `merge_lora`
does the same on an original-named state dict (ComfyUI format only), for checks and exports.
"""

import math
import os
from dataclasses import dataclass
from typing import Sequence

import torch

from ..errors import RefAlignInputError

LORA_PREFIX = "diffusion_model."
ADAPTER_PREFIX = "refalign_lora_"
MAX_STRENGTH = 100.0  # ComfyUI's LoraLoader range, ±100; past it a delta swamps any weight


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA file and its strength."""

    path: str
    strength: float = 1.0

    def __post_init__(self):
        if isinstance(self.strength, bool) or not isinstance(self.strength, (int, float)) or \
                not math.isfinite(self.strength) or abs(self.strength) > MAX_STRENGTH:
            raise RefAlignInputError(f"LoRA {self.path}: strength must be a number in [-{MAX_STRENGTH:g}, "
                                     f"{MAX_STRENGTH:g}], got {self.strength!r}")

    @classmethod
    def parse(cls, text: str) -> "LoraSpec":
        """`FILE` or `FILE:STRENGTH` (the CLI's `--lora`)."""
        path, sep, strength = text.rpartition(":")
        if sep and path and not os.path.exists(text):
            try:
                value = float(strength)
            except ValueError:
                raise RefAlignInputError(f"--lora {text}: the strength after ':' must be a number") from None
            return cls(path, value)
        return cls(text)


def _check_pair(name: str, module: str, down: torch.Tensor, up: torch.Tensor) -> None:
    """One LoRA module's down (A, `[r, in]`) and up (B, `[out, r]`): the same rank, finite values."""
    if down.ndim != 2 or up.ndim != 2 or down.shape[0] != up.shape[1]:
        raise RefAlignInputError(f"{name}: {module} has down / A {tuple(down.shape)} and up / B {tuple(up.shape)}: "
                                 "expected [rank, in] and [out, rank] with the same rank")
    for part, tensor in (("down / A", down), ("up / B", up)):
        if not bool(torch.isfinite(tensor.float()).all()):
            raise RefAlignInputError(f"{name}: {module} {part} has NaN or infinite values")


def merge_lora(state_dict: dict[str, torch.Tensor], lora: dict[str, torch.Tensor], strength: float = 1.0,
               name: str = "LoRA") -> dict[str, torch.Tensor]:
    """Original-named DiT weights with a ComfyUI-format LoRA merged in (a new dict; merged in fp32, stored in each
    weight's dtype). A LoRA module with no matching weight, or of the wrong shape, is refused naming `name`."""
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
        _check_pair(name, module, down, up)
        rank = down.shape[0]
        alpha = float(lora[module + ".alpha"]) if module + ".alpha" in lora else rank
        delta = (up.float() @ down) * (strength * alpha / rank)
        if delta.shape != weight.shape:
            raise RefAlignInputError(f"{name}: {module} is {tuple(delta.shape)}, the DiT weight is "
                                     f"{tuple(weight.shape)} (wrong base model?)")
        merged[target + ".weight"] = (weight.float() + delta).to(weight.dtype)
    return merged


def _original_module_names(dit) -> list[str]:
    from .checkpoint import diffusers_to_original_key
    return [diffusers_to_original_key(k)[: -len(".weight")] for k in dit.state_dict() if k.endswith(".weight")]


def _kohya_to_original(lora: dict, dit, name: str) -> dict:
    """`lora_unet_blocks_0_self_attn_q.lora_down.weight` -> `diffusion_model.blocks.0.self_attn.q.lora_down.weight`,
    resolved against the DiT's module names (the underscore form is ambiguous only in theory: it is checked)."""
    table = {"lora_unet_" + m.replace(".", "_"): m for m in _original_module_names(dit)}
    out = {}
    for key, value in lora.items():
        module, _, suffix = key.partition(".")
        if module not in table:
            raise RefAlignInputError(f"{name}: {module} matches no module of this Wan2.1 DiT (wrong base model?)")
        out[f"{LORA_PREFIX}{table[module]}.{suffix}"] = value
    return out


def to_diffusers_lora(lora: dict[str, torch.Tensor], dit, name: str = "LoRA") -> dict[str, torch.Tensor]:
    """Any supported LoRA format -> diffusers names without prefix (`blocks.0.attn1.to_q.lora_A.weight`, alpha
    folded in)."""
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_wan_lora_to_diffusers

    keys = list(lora)
    if not keys:
        raise RefAlignInputError(f"{name}: the file holds no tensors")
    if all(k.startswith("lora_unet_") for k in keys):
        lora = _kohya_to_original(lora, dit, name)
        keys = list(lora)
    original_style = any(s in k for k in keys for s in (".lora_down.", ".lora_up.", ".diff_b", ".alpha")) or \
        any(k.startswith(LORA_PREFIX) for k in keys)
    if original_style:
        lora = {(k if k.startswith(LORA_PREFIX) else LORA_PREFIX + k): v for k, v in lora.items()}
        try:
            converted = _convert_non_diffusers_wan_lora_to_diffusers(dict(lora))
        except (KeyError, ValueError) as e:
            raise RefAlignInputError(f"{name}: not a Wan2.1 LoRA this DiT can take ({type(e).__name__}: "
                                     f"{str(e)[:200]})") from None
    else:
        converted = dict(lora)
    out = {}
    for key, value in converted.items():
        for prefix in ("base_model.model.", "transformer."):
            key = key.removeprefix(prefix)
        out[key] = value
    return out


def check_lora_fits(lora: dict[str, torch.Tensor], dit, name: str) -> None:
    """Every LoRA module names a Linear of this DiT with matching in/out features; else one error naming `name`."""
    modules = dict(dit.named_modules())
    pairs = {}
    for key, value in lora.items():
        module, _, rest = key.rpartition(".lora_")
        if not module or rest not in ("A.weight", "B.weight", "B.bias"):
            raise RefAlignInputError(f"{name}: unexpected key {key!r}: not a LoRA tensor")
        pairs.setdefault(module, {})[rest] = value
    if not pairs:
        raise RefAlignInputError(f"{name}: no LoRA modules found")
    for module, parts in pairs.items():
        target = modules.get(module)
        target = getattr(target, "base_layer", target)
        if not isinstance(target, torch.nn.Linear):
            raise RefAlignInputError(f"{name}: {module} matches no linear layer of this DiT (wrong base model?)")
        a, b = parts.get("A.weight"), parts.get("B.weight")
        if a is None or b is None:
            raise RefAlignInputError(f"{name}: {module} has only one of lora_A / lora_B")
        _check_pair(name, module, a, b)
        if "B.bias" in parts and not bool(torch.isfinite(parts["B.bias"].float()).all()):
            raise RefAlignInputError(f"{name}: {module} bias delta has NaN or infinite values")
        if a.shape[1] != target.in_features or b.shape[0] != target.out_features:
            raise RefAlignInputError(f"{name}: {module} is {b.shape[0]}x{a.shape[1]}, the DiT layer is "
                                     f"{target.out_features}x{target.in_features} (wrong base model, e.g. 14B LoRA "
                                     "on the 1.3B?)")


def read_lora(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    from .safetensors_io import read_safetensors
    tensors, _ = read_safetensors(path, f"LoRA {path}")
    return tensors


def apply_loras(dit, loras: Sequence[LoraSpec], fuse: bool = True) -> list[str]:
    """Load LoRAs into the DiT as peft adapters with their strengths, replacing any applied before; fused into the
    weights when `fuse` (no per-step cost; `remove_loras` unfuses), except over fp8 storage, where the adapters run
    unfused in the compute dtype. Strength 0 is skipped. Returns the adapter names."""
    remove_loras(dit)
    compute = dit.patch_embedding.weight.dtype  # kept in the compute dtype under low-precision storage
    if fuse and dit.blocks[0].ffn.net[2].weight.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        fuse = False  # fp8 storage cannot take W + Δ; the adapters run beside it in the compute dtype
    names, weights = [], []
    for index, spec in enumerate(loras):
        if spec.strength == 0:
            continue
        name = f"LoRA {spec.path}"
        converted = to_diffusers_lora(read_lora(spec.path), dit, name)
        check_lora_fits(converted, dit, name)
        adapter = f"{ADAPTER_PREFIX}{index}"
        dit.load_lora_adapter(converted, adapter_name=adapter, prefix=None)
        for param_name, param in dit.named_parameters():
            if f".{adapter}." in param_name:
                param.data = param.data.to(compute)
        names.append(adapter)
        weights.append(float(spec.strength))
    if names:
        dit.set_adapters(names, weights=weights)
        if fuse:
            dit.fuse_lora(adapter_names=names)
    dit._refalign_loras = (list(loras), names, fuse)
    return names


def remove_loras(dit) -> None:
    """Undo `apply_loras`: unfuse, then drop the adapters (the base weights come back up to float rounding of
    W + Δ − Δ)."""
    _, names, fused = getattr(dit, "_refalign_loras", ((), [], False))
    if names:
        if fused:
            dit.unfuse_lora()
        dit.delete_adapters(names)
    dit._refalign_loras = ((), [], False)


def applied_loras(dit) -> list[LoraSpec]:
    return list(getattr(dit, "_refalign_loras", ((), [], False))[0])
