"""What a generation needs in memory, estimated before any work, against what is free (host RAM within a container's
limit, or a CUDA device's free memory): a run that cannot fit is refused with the numbers."""

from pathlib import Path

import numpy as np
import torch

from ..errors import RefAlignInputError
from .extension import Extension
from .sampler import SamplingSettings, guidance_weights

GB = 1e9


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_available() -> int | None:
    """What a container's memory limit leaves (cgroup v2 or v1; reclaimable file cache counted as free)."""
    for limit_file, usage_file, stat_file, inactive in (
            ("memory.max", "memory.current", "memory.stat", "inactive_file"),
            ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes", "memory/memory.stat",
             "total_inactive_file")):
        root = Path("/sys/fs/cgroup")
        try:
            limit = (root / limit_file).read_text().strip()
            if limit == "max" or int(limit) >= 2**60:
                return None
            stat = dict(line.split() for line in (root / stat_file).read_text().splitlines())
            return int(limit) - int((root / usage_file).read_text()) + int(stat.get(inactive, 0))
        except (OSError, ValueError):
            continue
    return None


def available_memory(device: str = "cpu") -> int | None:
    """Bytes a run can still take on `device`: a CUDA device's free memory; for the CPU the host's available memory
    (`/proc/meminfo`, else psutil), capped by a container's limit; None where this cannot be read."""
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.cuda.mem_get_info(torch.device(device))[0]
    if kind != "cpu":
        return None
    host = _meminfo_available()
    if host is None:
        try:
            import psutil
            host = psutil.virtual_memory().available
        except ImportError:
            pass
    values = [v for v in (host, _cgroup_available()) if v is not None]
    return min(values) if values else None


def memory_estimate(settings: SamplingSettings, dit_config, num_references: int, *, compute_dtype=torch.float32,
                    weight_bytes: int = 0, decode: bool = True, batch_passes: bool = True,
                    device: str = "cpu", extension: Extension = Extension()) -> dict[str, tuple[int, str]]:
    """A lower bound of what a run holds, in bytes per part, each "device" or "host": the weights, the sampler's
    fp32 latents (noise, state, velocity and pass outputs; each segment's clip is kept), the largest DiT step (the
    FFN of one block over the video + reference tokens, batched over the guidance passes on the CPU, plus the
    float64 RoPE tables) and the decoded video (the VAE's output and its float copies; a video of several segments
    is always decoded, and joined). The step and the decode never overlap."""
    on_cpu = torch.device(device).type == "cpu"
    width = torch.finfo(compute_dtype).bits // 8
    latent = settings.latent_shape(dit_config["in_channels"])
    p_t, p_h, p_w = dit_config["patch_size"]
    tokens = (latent[2] + num_references) // p_t * (latent[3] // p_h) * (latent[4] // p_w)
    dim = dit_config["num_attention_heads"] * dit_config["attention_head_dim"]
    passes = sum(w != 0 for w in guidance_weights(settings.image_scale, settings.text_scale))
    batch = max(1, passes) if batch_passes and settings.cache == "none" and on_cpu else 1
    clip = 3 * settings.num_frames * settings.height * settings.width
    video = 3 * extension.total_frames(settings.num_frames) * settings.height * settings.width
    parts = {"weights": (weight_bytes, "device"),
             "latents": ((3 + extension.segments) * 4 * int(np.prod(latent)), "host"),
             "largest DiT step": (batch * tokens * (2 * dim + 2 * dit_config["ffn_dim"]) * width
                                  + 2 * tokens * dit_config["attention_head_dim"] * 8, "device")}
    if decode or extension.segments > 1:
        parts["decoded video"] = (3 * video * 4, "host")
        if not on_cpu:
            parts["decoded video on the device"] = (2 * clip * width, "device")  # one segment at a time
    return parts


def check_memory(settings: SamplingSettings, parts: dict[str, tuple[int, str]], num_references: int,
                 device: str = "cpu") -> None:
    """Refuse, before any work, a run whose `memory_estimate` exceeds what `available_memory` says is free."""
    places = ("host",) if torch.device(device).type == "cpu" else ("device", "host")
    for place in places:
        mine = {name: size for name, (size, where) in parts.items() if where == place or len(places) == 1}
        decode = sum(size for name, size in mine.items() if name.startswith("decoded video"))
        step = mine.get("largest DiT step", 0)
        need = sum(mine.values()) - decode - step + max(decode, step)
        free = available_memory(device if place == "device" else "cpu")
        if free is not None and need > free:
            listed = ", ".join(f"{name} {size / GB:.2f} GB" for name, size in mine.items() if size)
            raise RefAlignInputError(
                f"width x height x frames {settings.width}x{settings.height}x{settings.num_frames} with "
                f"{num_references} reference(s) needs at least {need / GB:.1f} GB of {place} memory ({listed}; "
                f"the DiT step and the decode do not overlap) but {free / GB:.1f} GB is free: lower the size or "
                "the frame count")
