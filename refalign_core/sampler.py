"""R2V sampling: rectified flow with shift, Euler or UniPC (diffusers schedulers), three-pass guidance

    v = u + s_img·(c_img − u) + s_txt·(c_txt − c_img)

u: negative prompt + zeroed references, c_img: negative prompt + references, c_txt: prompt + references.

`SamplingSettings` holds every sampling choice (defaults once, validated once); `run_schedule` is the one denoising
loop, shared by the core sampler (`sample_r2v`) and the ComfyUI-native sampler in `nodes/`."""

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

from .errors import RefAlignInputError

logger = logging.getLogger(__name__)

SAMPLERS = ("euler", "unipc")
UNCOND_REFERENCES = ("zeros_per_reference", "one_zero_frame")
MAX_SEED = 2**64 - 1


class SamplingCancelled(Exception):
    """Raised when `cancel_check()` returned True; nothing is returned."""


def _int(name, value, minimum=None, maximum=None):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise RefAlignInputError(f"{name} must be an integer, got {value!r}")
    if minimum is not None and value < minimum or maximum is not None and value > maximum:
        bounds = f"in [{minimum}, {maximum}]" if maximum is not None else f"≥ {minimum}"
        raise RefAlignInputError(f"{name} must be {bounds}, got {value}")
    return int(value)


def _float(name, value, minimum=None, exclusive_minimum=False):
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) or not math.isfinite(value):
        raise RefAlignInputError(f"{name} must be a finite number, got {value!r}")
    if minimum is not None and (value <= minimum if exclusive_minimum else value < minimum):
        raise RefAlignInputError(f"{name} must be {'>' if exclusive_minimum else '≥'} {minimum}, got {value}")
    return float(value)


@dataclass(frozen=True)
class SamplingSettings:
    """Everything that decides a generation besides the model, prompt and references. Defaults follow the official
    RefAlign inference (832×480, 81 frames, 50 Euler steps, shift 5, s_img 5.0, s_txt 7.5)."""

    width: int = 832
    height: int = 480
    num_frames: int = 81
    steps: int = 50
    shift: float = 5.0
    image_scale: float = 5.0
    text_scale: float = 7.5
    sampler: str = "euler"
    seed: int = 0
    uncond_references: str = "zeros_per_reference"

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen dataclass)
        for name in ("width", "height"):
            value = _int(name, getattr(self, name))
            if value < 16 or value % 16:
                raise RefAlignInputError(f"width and height must be positive multiples of 16, got "
                                         f"{self.width}x{self.height}")
            set_(name, value)
        frames = _int("num_frames", self.num_frames, 1)
        if (frames - 1) % 4:
            raise RefAlignInputError(f"length must be 4n+1 frames (1, 5, …, 81), got {frames}")
        set_("num_frames", frames)
        set_("steps", _int("steps", self.steps, 1, 10_000))
        set_("shift", _float("shift", self.shift, 0.0, exclusive_minimum=True))
        set_("image_scale", _float("image_scale", self.image_scale))
        set_("text_scale", _float("text_scale", self.text_scale))
        set_("seed", _int("seed", self.seed, 0, MAX_SEED))
        if self.sampler not in SAMPLERS:
            raise RefAlignInputError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if self.uncond_references not in UNCOND_REFERENCES:
            raise RefAlignInputError(f"uncond_references must be one of {UNCOND_REFERENCES}, "
                                     f"got {self.uncond_references!r}")

    @classmethod
    def from_dict(cls, values: dict, source: str = "settings") -> "SamplingSettings":
        """Settings from a dict (e.g. a bundle's defaults); an unknown key is refused, naming `source`."""
        return cls().replace(source=source, **values)

    def replace(self, source: str = "settings", **changes) -> "SamplingSettings":
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise RefAlignInputError(f"{source}: unknown setting(s) {unknown}; known: {sorted(known)}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def latent_shape(self, channels: int = 16) -> tuple[int, ...]:
        """Video latents `[1, C, (F−1)/4+1, H/8, W/8]`."""
        return (1, channels, (self.num_frames - 1) // 4 + 1, self.height // 8, self.width // 8)


def three_pass_guidance(uncond, image_cond, text_cond, image_scale: float, text_scale: float):
    return uncond + image_scale * (image_cond - uncond) + text_scale * (text_cond - image_cond)


def guidance_weights(image_scale: float, text_scale: float) -> tuple[float, float, float]:
    """The three-pass formula as weights of (u, c_img, c_txt): v = (1−s_img)·u + (s_img−s_txt)·c_img + s_txt·c_txt."""
    return 1.0 - image_scale, image_scale - text_scale, text_scale


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


def initial_noise(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """fp32 CPU noise from a CPU generator, so a seed gives the same video on every device (and the same noise as
    ComfyUI's own samplers for that seed)."""
    return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)


Velocity = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def run_schedule(scheduler, latents: torch.Tensor, velocity: Velocity, *, callback=None,
                 cancel_check=None) -> torch.Tensor:
    """Integrate the flow from `latents` (pure noise at σ = 1) to σ = 0 over the scheduler's steps.

    velocity(latents, timestep, sigma) -> v (timestep = 1000·σ); callback(step, steps, latents) after every step;
    cancel_check() before every step (True cancels)."""
    steps = len(scheduler.timesteps)
    for i, t in enumerate(scheduler.timesteps):
        if cancel_check is not None and cancel_check():
            raise SamplingCancelled(f"cancelled before step {i + 1}/{steps}")
        v = velocity(latents, t, scheduler.sigmas[i])
        latents = scheduler.step(v, t, latents).prev_sample
        if callback is not None:
            callback(i + 1, steps, latents)
    return latents


@dataclass
class _Pass:
    weight: float
    text: torch.Tensor
    references: torch.Tensor


def _pad_text(texts: list[torch.Tensor]) -> torch.Tensor:
    length = max(t.shape[1] for t in texts)
    return torch.cat([torch.nn.functional.pad(t, (0, 0, 0, length - t.shape[1])) for t in texts])


def zero_references(reference_latents: torch.Tensor, uncond_references: str) -> torch.Tensor:
    """The unconditional pass's reference latents: K zero frames (official inference) or one (as in training)."""
    if uncond_references == "one_zero_frame":
        return torch.zeros_like(reference_latents[:, :, :1])
    return torch.zeros_like(reference_latents)


def _guidance_passes(prompt_embeds, negative_embeds, reference_latents, settings: SamplingSettings):
    """The passes with a non-zero weight in the three-pass formula."""
    # Zero-padded text tokens still enter cross-attention (as in Wan, which pads to 512), so both prompts get the
    # same length whether the passes run batched or one by one.
    prompt_embeds, negative_embeds = _pad_text([prompt_embeds, negative_embeds]).split(1)
    w_uncond, w_image, w_text = guidance_weights(settings.image_scale, settings.text_scale)
    passes = [
        _Pass(w_uncond, negative_embeds, zero_references(reference_latents, settings.uncond_references)),
        _Pass(w_image, negative_embeds, reference_latents),
        _Pass(w_text, prompt_embeds, reference_latents),
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

    def __call__(self, latents: torch.Tensor, timestep: torch.Tensor, sigma=None) -> torch.Tensor:
        if not self.passes:
            return torch.zeros_like(latents)
        timestep = timestep.float().reshape(1)
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


def check_reference_latents(reference_latents: torch.Tensor, settings: SamplingSettings, channels: int) -> None:
    shape = settings.latent_shape(channels)
    if reference_latents.ndim != 5 or reference_latents.shape[0] != 1 or \
            tuple(reference_latents.shape[3:]) != shape[3:] or reference_latents.shape[1] != shape[1]:
        raise RefAlignInputError(
            f"reference latents must be [1, {shape[1]}, K, {shape[3]}, {shape[4]}] for "
            f"{settings.width}x{settings.height}, got {tuple(reference_latents.shape)}"
        )


@torch.no_grad()
def sample_r2v(
    dit,
    prompt_embeds: torch.Tensor,
    negative_prompt_embeds: torch.Tensor,
    reference_latents: torch.Tensor,
    settings: SamplingSettings = SamplingSettings(),
    *,
    batch_passes: bool = True,
    callback: Callable[[int, int, torch.Tensor], None] | None = None,
    cancel_check: Callable[[], bool] | None = None,
) -> torch.Tensor:
    """Generate video latents `[1, 16, (F−1)/4+1, H/8, W/8]` (fp32, CPU) with our DiT.

    prompt_embeds / negative_prompt_embeds: `[1, L, text_dim]`; reference_latents: clean `[1, 16, K, H/8, W/8]`.
    callback(step, steps, latents) runs after every step; cancel_check() before every step (True cancels)."""
    check_reference_latents(reference_latents, settings, dit.config.in_channels)
    for name, emb in (("prompt embeddings", prompt_embeds), ("negative prompt embeddings", negative_prompt_embeds)):
        if emb.ndim != 3 or emb.shape[0] != 1 or emb.shape[2] != dit.config.text_dim:
            raise RefAlignInputError(f"{name} must be [1, L, {dit.config.text_dim}], got {tuple(emb.shape)}")
    passes = _guidance_passes(prompt_embeds.float(), negative_prompt_embeds.float(), reference_latents.float(),
                              settings)
    scheduler = make_scheduler(settings.sampler, settings.steps, settings.shift)
    latents = initial_noise(settings.latent_shape(dit.config.in_channels), settings.seed)
    return run_schedule(scheduler, latents, _Velocity(dit, passes, batch_passes), callback=callback,
                        cancel_check=cancel_check)
