"""R2V sampling: rectified flow with shift, Euler or UniPC (diffusers schedulers), three-pass guidance

    v = u + s_img·(c_img − u) + s_txt·(c_txt − c_img)

u: negative prompt + zeroed references, c_img: negative prompt + references, c_txt: prompt + references."""

import logging
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

from .errors import RefAlignInputError

logger = logging.getLogger(__name__)

SAMPLERS = ("euler", "unipc")
UNCOND_REFERENCES = ("zeros_per_reference", "one_zero_frame")


class SamplingCancelled(Exception):
    """Raised when `cancel_check()` returned True; nothing is returned."""


def three_pass_guidance(uncond, image_cond, text_cond, image_scale: float, text_scale: float):
    return uncond + image_scale * (image_cond - uncond) + text_scale * (text_cond - image_cond)


def make_scheduler(sampler: str, steps: int, shift: float):
    """A diffusers scheduler with its timesteps set. Euler uses the official grid σ_n = shift(1 − n/N) /
    (1 + (shift − 1)(1 − n/N)), n = 0..N−1, then 0."""
    if sampler == "euler":
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.0, steps + 1)[:-1].tolist())
    elif sampler == "unipc":
        scheduler = UniPCMultistepScheduler(
            num_train_timesteps=1000, prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift
        )
        scheduler.set_timesteps(steps)
    else:
        raise RefAlignInputError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    return scheduler


def latent_shape(num_frames: int, height: int, width: int, channels: int = 16) -> tuple[int, ...]:
    """Video latents `[1, C, (F−1)/4+1, H/8, W/8]`, validating F = 4n+1 and H, W multiples of 16."""
    if num_frames < 1 or (num_frames - 1) % 4:
        raise RefAlignInputError(f"length must be 4n+1 frames (1, 5, …, 81), got {num_frames}")
    if height % 16 or width % 16 or height <= 0 or width <= 0:
        raise RefAlignInputError(f"width and height must be positive multiples of 16, got {width}x{height}")
    return (1, channels, (num_frames - 1) // 4 + 1, height // 8, width // 8)


@dataclass
class _Pass:
    weight: float
    text: torch.Tensor
    references: torch.Tensor


def _pad_text(texts: list[torch.Tensor]) -> torch.Tensor:
    length = max(t.shape[1] for t in texts)
    return torch.cat([torch.nn.functional.pad(t, (0, 0, 0, length - t.shape[1])) for t in texts])


def _guidance_passes(prompt_embeds, negative_embeds, reference_latents, image_scale, text_scale, uncond_references):
    """The passes with a non-zero weight in v = (1−s_img)·u + (s_img−s_txt)·c_img + s_txt·c_txt."""
    if uncond_references == "zeros_per_reference":
        zero_refs = torch.zeros_like(reference_latents)
    elif uncond_references == "one_zero_frame":
        zero_refs = torch.zeros_like(reference_latents[:, :, :1])
    else:
        raise RefAlignInputError(f"uncond_references must be one of {UNCOND_REFERENCES}, got {uncond_references!r}")
    # Zero-padded text tokens still enter cross-attention (as in Wan, which pads to 512), so both prompts get the
    # same length whether the passes run batched or one by one.
    prompt_embeds, negative_embeds = _pad_text([prompt_embeds, negative_embeds]).split(1)
    passes = [
        _Pass(1.0 - image_scale, negative_embeds, zero_refs),
        _Pass(image_scale - text_scale, negative_embeds, reference_latents),
        _Pass(text_scale, prompt_embeds, reference_latents),
    ]
    return [p for p in passes if p.weight != 0.0]


class _Velocity:
    """Runs the guidance passes, batched into one forward per reference shape when `batch_passes`; falls back to
    one pass per forward after an out-of-memory error."""

    def __init__(self, dit, passes: list[_Pass], batch_passes: bool):
        self.dit, self.passes, self.batch = dit, passes, batch_passes
        self.dtype = dit.patch_embedding.weight.dtype
        self.device = dit.patch_embedding.weight.device

    def _forward(self, latents, timestep, group: list[_Pass]) -> list[torch.Tensor]:
        n = len(group)
        out = self.dit(
            latents.to(self.device, self.dtype).expand(n, -1, -1, -1, -1),
            timestep.to(self.device).expand(n),
            torch.cat([p.text for p in group]).to(self.device, self.dtype),
            reference_latents=torch.cat([p.references for p in group]).to(self.device, self.dtype),
        ).sample
        return list(out.float().cpu().split(1))

    def __call__(self, latents: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        outputs = {}
        if self.batch:
            groups: dict[tuple, list[int]] = {}
            for i, p in enumerate(self.passes):
                groups.setdefault(tuple(p.references.shape), []).append(i)
            try:
                for indices in groups.values():
                    outputs.update(zip(indices, self._forward(latents, timestep, [self.passes[i] for i in indices])))
            except torch.OutOfMemoryError:
                logger.warning("out of memory with batched guidance passes; running them one at a time")
                self.batch, outputs = False, {}
        if not self.batch:
            for i, p in enumerate(self.passes):
                outputs[i] = self._forward(latents, timestep, [p])[0]
        return sum(p.weight * outputs[i] for i, p in enumerate(self.passes))


@torch.no_grad()
def sample_r2v(
    dit,
    prompt_embeds: torch.Tensor,
    negative_prompt_embeds: torch.Tensor,
    reference_latents: torch.Tensor,
    *,
    num_frames: int = 81,
    height: int = 480,
    width: int = 832,
    steps: int = 50,
    shift: float = 5.0,
    image_scale: float = 5.0,
    text_scale: float = 7.5,
    sampler: str = "euler",
    seed: int = 0,
    uncond_references: str = "zeros_per_reference",
    batch_passes: bool = True,
    callback: Callable[[int, int, torch.Tensor], None] | None = None,
    cancel_check: Callable[[], bool] | None = None,
) -> torch.Tensor:
    """Generate video latents `[1, 16, (F−1)/4+1, H/8, W/8]` (fp32, CPU).

    prompt_embeds / negative_prompt_embeds: `[1, L, text_dim]`; reference_latents: clean `[1, 16, K, H/8, W/8]`.
    callback(step, steps, latents) runs after every step; cancel_check() before every step (True cancels).
    The noise comes from a CPU generator, so a seed gives the same video on every device."""
    shape = latent_shape(num_frames, height, width, dit.config.in_channels)
    if steps < 1:
        raise RefAlignInputError(f"steps must be ≥ 1, got {steps}")
    if reference_latents.ndim != 5 or reference_latents.shape[0] != 1 or \
            tuple(reference_latents.shape[3:]) != shape[3:] or reference_latents.shape[1] != shape[1]:
        raise RefAlignInputError(
            f"reference latents must be [1, {shape[1]}, K, {shape[3]}, {shape[4]}] for {width}x{height}, "
            f"got {tuple(reference_latents.shape)}"
        )
    for name, emb in (("prompt embeddings", prompt_embeds), ("negative prompt embeddings", negative_prompt_embeds)):
        if emb.ndim != 3 or emb.shape[0] != 1 or emb.shape[2] != dit.config.text_dim:
            raise RefAlignInputError(f"{name} must be [1, L, {dit.config.text_dim}], got {tuple(emb.shape)}")
    scheduler = make_scheduler(sampler, steps, shift)
    passes = _guidance_passes(prompt_embeds.float(), negative_prompt_embeds.float(), reference_latents.float(),
                              image_scale, text_scale, uncond_references)
    velocity = _Velocity(dit, passes, batch_passes)
    generator = torch.Generator("cpu").manual_seed(seed)
    latents = torch.randn(shape, generator=generator, dtype=torch.float32)
    for i, t in enumerate(scheduler.timesteps):
        if cancel_check is not None and cancel_check():
            raise SamplingCancelled(f"cancelled before step {i + 1}/{steps}")
        v = velocity(latents, t.float().reshape(1)) if passes else torch.zeros_like(latents)
        latents = scheduler.step(v, t, latents).prev_sample
        if callback is not None:
            callback(i + 1, steps, latents)
    return latents
