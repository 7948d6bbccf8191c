"""Wan2.1 VAE: diffusers `AutoencoderKLWan` from one local safetensors file (original Wan naming, ComfyUI's
`wan_2.1_vae.safetensors`, or diffusers naming) with the shipped config. Latents are mean/std-normalised, as the
DiT sees them. Other VAEs with the Wan2.1 latent layout (the embedded toy model's) are saved with their class name
and config and loaded by that name through `registry.py` (a file never chooses which code runs)."""

import functools
import json
import os
import re
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

from .. import registry
from ..errors import RefAlignInputError, first_non_finite
from .safetensors_io import read_safetensors, write_safetensors

WAN21_VAE_CONFIG = Path(__file__).parent / "configs" / "wan2.1_vae.json"
CONFIG_METADATA_KEY = "refalign.vae_config"
CLASS_METADATA_KEY = "refalign.vae_class"  # absent for Wan2.1 VAEs
VAE_PREFIXES = ("first_stage_model.", "vae.")
_RESIDUAL = {"norm1": "residual.0", "conv1": "residual.2", "norm2": "residual.3", "conv2": "residual.6",
             "conv_shortcut": "shortcut"}
_DECODER_ENTRIES_PER_UP_BLOCK = 4  # 3 residual blocks + 1 upsampler (num_res_blocks = 2, as diffusers converts)


def _residual(name: str) -> str:
    module, _, leaf = name.partition(".")
    return f"{_RESIDUAL[module]}.{leaf}" if module in _RESIDUAL else name


def vae_diffusers_to_original_key(key: str) -> str:
    """diffusers `AutoencoderKLWan` key -> original Wan2.1 VAE key (inverse of diffusers' converter)."""
    side, _, rest = key.partition(".")
    if side in ("quant_conv", "post_quant_conv"):
        return {"quant_conv": "conv1", "post_quant_conv": "conv2"}[side] + "." + rest
    simple = {"conv_in.": "conv1.", "conv_out.": "head.2.", "norm_out.": "head.0.",
              "mid_block.attentions.0.": "middle.1."}
    for old, new in simple.items():
        if rest.startswith(old):
            return f"{side}.{new}{rest[len(old):]}"
    if m := re.match(r"mid_block\.resnets\.(\d)\.(.+)", rest):
        return f"{side}.middle.{2 * int(m.group(1))}.{_residual(m.group(2))}"
    if m := re.match(r"down_blocks\.(\d+)\.(.+)", rest):
        return f"{side}.downsamples.{m.group(1)}.{_residual(m.group(2))}"
    if m := re.match(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", rest):
        index = _DECODER_ENTRIES_PER_UP_BLOCK * int(m.group(1)) + int(m.group(2))
        return f"{side}.upsamples.{index}.{_residual(m.group(3))}"
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.(.+)", rest):
        index = _DECODER_ENTRIES_PER_UP_BLOCK * int(m.group(1)) + 3
        return f"{side}.upsamples.{index}.{m.group(2)}"
    raise KeyError(f"no original Wan VAE name for diffusers key {key!r}")


def _stored_config(metadata: dict, path) -> dict:
    """The config a VAE file carries in its metadata (an empty one when it has none)."""
    try:
        config = json.loads(metadata.get(CONFIG_METADATA_KEY, "{}"))
    except ValueError as e:
        raise RefAlignInputError(f"{path}: its '{CONFIG_METADATA_KEY}' metadata is not JSON: {e}") from e
    if not isinstance(config, dict):
        raise RefAlignInputError(f"{path}: its '{CONFIG_METADATA_KEY}' metadata must be a JSON object, got "
                                 f"{type(config).__name__}")
    return config


def _vae_config(state_dict: dict, metadata: dict, path) -> dict:
    config = json.loads(WAN21_VAE_CONFIG.read_text())
    config.update(_stored_config(metadata, path))
    config["base_dim"] = state_dict["encoder.conv_in.weight"].shape[0]
    config["z_dim"] = state_dict["quant_conv.weight"].shape[0] // 2
    return config


def _wan_vae_state_and_config(state_dict: dict, metadata: dict, path) -> tuple[dict, dict]:
    """Any supported Wan2.1 VAE naming -> (diffusers-named state dict, `AutoencoderKLWan` config)."""
    for prefix in VAE_PREFIXES:
        if any(k.startswith(prefix) for k in state_dict):
            state_dict = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if "encoder.conv1.weight" in state_dict and "conv1.weight" in state_dict:
        state_dict = convert_wan_vae_to_diffusers(state_dict)
    elif "encoder.conv_in.weight" not in state_dict:
        raise RefAlignInputError(
            f"{path} is not a Wan VAE (no encoder.conv1 / encoder.conv_in); first keys: {sorted(state_dict)[:6]}"
        )
    config = _vae_config(state_dict, metadata, path)
    if config["z_dim"] != len(config["latents_mean"]):
        raise RefAlignInputError(
            f"{path} has {config['z_dim']} latent channels; only the 16-channel Wan2.1 VAE is supported "
            "(the 48-channel Wan2.2 VAE is not)"
        )
    return state_dict, config


def _other_vae_class(name: str, path):
    """A VAE class other than the Wan2.1 VAE, by the name registered for it (`registry.register_vae_class`)."""
    vae_class = registry.vae_class(name)
    if vae_class is None:
        raise RefAlignInputError(f"{path}: VAE class {name!r} is not one we load: no extension registers it "
                                 f"(registered: {registry.vae_class_names()}; extensions: {list(registry.EXTENSIONS)})")
    return vae_class


def vae_from_state_dict(state_dict: dict, metadata: dict | None = None, *, dtype=torch.float32, device="cpu",
                        path="VAE") -> torch.nn.Module:
    metadata = metadata or {}
    if CLASS_METADATA_KEY in metadata:
        vae_class = _other_vae_class(metadata[CLASS_METADATA_KEY], path)
        config = _stored_config(metadata, path)
    else:
        vae_class = AutoencoderKLWan
        state_dict, config = _wan_vae_state_and_config(state_dict, metadata, path)
    try:
        with torch.device("meta"):
            vae = vae_class(**config)
    except (TypeError, ValueError) as e:
        raise RefAlignInputError(f"{path}: its '{CONFIG_METADATA_KEY}' metadata is not a {vae_class.__name__} "
                                 f"config: {e}") from e
    try:
        vae.load_state_dict({k: v.to(device, dtype) for k, v in state_dict.items()}, strict=True, assign=True)
    except RuntimeError as e:
        layout = "Wan2.1 VAE layout" if vae_class is AutoencoderKLWan else f"{vae_class.__name__} config"
        raise RefAlignInputError(f"{path} does not match the {layout}: {e}") from e
    return vae.eval().requires_grad_(False)


def load_vae(path: str | os.PathLike, *, dtype=torch.float32, device="cpu") -> torch.nn.Module:
    """Load a Wan2.1 VAE from a local .safetensors file (any supported naming), or a saved `ToyVideoVAE`."""
    state_dict, metadata = read_safetensors(path, "VAE")
    return vae_from_state_dict(state_dict, metadata, dtype=dtype, device=device, path=str(path))


def save_vae(vae: torch.nn.Module, path: str | os.PathLike) -> None:
    """Save in original Wan2.1 VAE naming; non-default config values go into the metadata. Another VAE class (one
    registered in `registry.py`) is saved with its own key names, its class name and its whole config."""
    if not isinstance(vae, AutoencoderKLWan):
        name = type(vae).__name__
        _other_vae_class(name, path)
        config = {k: v for k, v in vae.config.items() if not k.startswith("_")}
        write_safetensors(dict(vae.state_dict()), path, {CLASS_METADATA_KEY: name,
                                                         CONFIG_METADATA_KEY: json.dumps(config)})
        return
    defaults = json.loads(WAN21_VAE_CONFIG.read_text())
    changed = {k: v for k, v in dict(vae.config).items() if k in defaults and v != defaults[k]}
    tensors = {vae_diffusers_to_original_key(k): v for k, v in vae.state_dict().items()}
    write_safetensors(tensors, path, {CONFIG_METADATA_KEY: json.dumps(changed)})


@functools.cache
def _wan21_stats() -> tuple[torch.Tensor, torch.Tensor]:
    config = json.loads(WAN21_VAE_CONFIG.read_text())
    shape = (1, len(config["latents_mean"]), 1, 1, 1)
    return torch.tensor(config["latents_mean"]).view(shape), torch.tensor(config["latents_std"]).view(shape)


def wan21_latent_stats() -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel latent mean and std of the Wan2.1 VAE, `[1, 16, 1, 1, 1]` each (DiT space = (z − mean) / std)."""
    mean, std = _wan21_stats()
    return mean.clone(), std.clone()


def wan21_to_dit_space(latents: torch.Tensor) -> torch.Tensor:
    """Latents in the Wan2.1 VAE's own space (as ComfyUI's LATENT holds them) -> DiT space, fp32 on the CPU."""
    mean, std = _wan21_stats()
    return (latents.float().cpu() - mean) / std


def dit_to_wan21_space(latents: torch.Tensor) -> torch.Tensor:
    """DiT-space latents -> the Wan2.1 VAE's own space, fp32 on the CPU."""
    mean, std = _wan21_stats()
    return latents.float().cpu() * std + mean


def latent_stats(vae: torch.nn.Module, like: torch.Tensor | None = None):
    """A loaded VAE's own per-channel latent mean and std, `[1, C, 1, 1, 1]` each, with `like`'s dtype and device."""
    like = like if like is not None else torch.empty(0)
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean, dtype=like.dtype, device=like.device).view(shape)
    std = torch.tensor(vae.config.latents_std, dtype=like.dtype, device=like.device).view(shape)
    return mean, std


def _check_finite(vae: torch.nn.Module, output: torch.Tensor, what: str, given: torch.Tensor) -> None:
    """A VAE output with NaN / inf is refused, naming a broken weight when there is one, else the input's range."""
    if bool(torch.isfinite(output).all()):
        return
    broken = first_non_finite(vae)
    cause = (f"its weight {broken} has NaN or infinite values" if broken is not None else
             f"its input's largest |value| is {float(given.abs().max()):.3g}")
    raise RefAlignInputError(f"VAE: {what} gave NaN or infinite values; {cause}")


@torch.no_grad()
def encode_video(vae: AutoencoderKLWan, video: torch.Tensor) -> torch.Tensor:
    """video `[B, 3, T, H, W]` in [-1, 1] -> normalised latents `[B, 16, (T-1)/4+1, H/8, W/8]` (posterior mean)."""
    param = next(vae.parameters())
    mu = vae.encode(video.to(param.device, param.dtype)).latent_dist.mode()
    _check_finite(vae, mu, "encoding", video)
    mean, std = latent_stats(vae, mu)
    return (mu - mean) / std


@torch.no_grad()
def decode_latents(vae: AutoencoderKLWan, latents: torch.Tensor) -> torch.Tensor:
    """normalised latents `[B, 16, T', h, w]` -> video `[B, 3, 4(T'-1)+1, 8h, 8w]` in [-1, 1]."""
    param = next(vae.parameters())
    latents = latents.to(param.device, param.dtype)
    mean, std = latent_stats(vae, latents)
    video = vae.decode(latents * std + mean).sample
    _check_finite(vae, video, "decoding", latents)
    return video.clamp_(-1, 1)
