"""R2V sampling: rectified flow with shift, Euler or UniPC (diffusers schedulers), three-pass guidance

    v = u + s_img·(c_img − u) + s_txt·(c_txt − c_img)

u: negative prompt + zeroed references, c_img: negative prompt + references, c_txt: prompt + references.

The image-guidance window `image_guidance_start` ≤ step / steps < `image_guidance_end` limits the image pass to a part
of the schedule; outside it the step runs u and c_txt only, v = u + s_txt·(c_txt − u) (c_img taken as u).

Fewer DiT evaluations: `guidance_steps` = n runs the guided passes for the first n steps and then c_txt alone (for
step-distill LoRAs, which are trained for one pass); `cache` puts a diffusers cache hook on the DiT with one state
per pass; `text_kv_cache` reuses each pass's text keys / values over the steps (exact). The text K/V caches belong
to one run and the MagCache ratios to their caller (`mag_ratio_memo`); the DiT keeps neither.

`SamplingSettings` holds every sampling choice (defaults once, validated once); `run_schedule` is the one denoising
loop, shared by the core sampler (`sample_r2v`) and the ComfyUI-native sampler in `nodes/`."""

import contextlib
import dataclasses
import logging
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

from ..errors import RefAlignInputError, first_non_finite
from ..models.lora import applied_loras
from ..models.transformer_refalign import TextKVCache
from ..validation import describe, finite_number, one_of, whole_number
from .caching import CACHES, MagCalibration, cache_config, dit_cache

logger = logging.getLogger(__name__)

SAMPLERS = ("euler", "unipc")
UNCOND_REFERENCES = ("zeros_per_reference", "one_zero_frame")
MAX_SEED = 2**64 - 1
# ComfyUI's own limits (ModelSamplingSD3's shift, the KSampler's cfg): past them the σ grid collapses (a shift of
# 1e-8 gives an infinite first timestep, 1e12 one repeated timestep) and guidance only amplifies noise
MIN_SHIFT, MAX_SHIFT = 0.01, 100.0
MAX_GUIDANCE_SCALE = 100.0
MAX_STEPS = 10_000
MAX_REFERENCE_STRENGTH = 2.0
SIZE_MULTIPLE = 16  # pixels: the DiT's 2×2 patches over the VAE's 8× downsampling
FRAMES_PER_LATENT = 4  # the VAE's time compression: a video has 4n+1 frames


class SamplingCancelled(Exception):
    """Raised when `cancel_check()` returned True; nothing is returned."""


def is_video_size(pixels: int) -> bool:
    return pixels >= SIZE_MULTIPLE and pixels % SIZE_MULTIPLE == 0


def is_frame_count(frames: int) -> bool:
    return frames >= 1 and (frames - 1) % FRAMES_PER_LATENT == 0


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
    guidance_steps: int | None = None  # None: three passes on every step; n: on the first n steps, then c_txt only
    cache: str = "none"  # one of CACHES
    cache_threshold: float | None = None  # first_block / magcache threshold (None: the cache's default)
    cache_interval: int | None = None  # taylorseer: full evaluation every n steps (None: 3)
    text_kv_cache: bool = False
    reference_strength: float = 1.0  # how much the video attends to the references (0: not at all, 1: as trained)
    image_guidance_start: float = 0.0  # the image pass runs while start ≤ step / steps < end (fractions)
    image_guidance_end: float = 1.0

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen dataclass)
        for name in ("width", "height"):
            value = whole_number(name, getattr(self, name))
            if not is_video_size(value):
                raise RefAlignInputError(f"width and height must be positive multiples of {SIZE_MULTIPLE}, got "
                                         f"{self.width}x{self.height}")
            set_(name, value)
        frames = whole_number("num_frames", self.num_frames, 1)
        if not is_frame_count(frames):
            raise RefAlignInputError(f"num_frames must be 4n+1 (1, 5, …, 81), got {frames}")
        set_("num_frames", frames)
        set_("steps", whole_number("steps", self.steps, 1, MAX_STEPS))
        set_("shift", finite_number("shift", self.shift, MIN_SHIFT, MAX_SHIFT))
        for name in ("image_scale", "text_scale"):
            set_(name, finite_number(name, getattr(self, name), -MAX_GUIDANCE_SCALE, MAX_GUIDANCE_SCALE))
        set_("seed", whole_number("seed", self.seed, 0, MAX_SEED))
        set_("reference_strength", finite_number("reference_strength", self.reference_strength, 0.0,
                                                 MAX_REFERENCE_STRENGTH))
        for name in ("image_guidance_start", "image_guidance_end"):
            set_(name, finite_number(name, getattr(self, name), 0.0, 1.0))
        if self.image_guidance_start > self.image_guidance_end:
            raise RefAlignInputError(f"image_guidance_start: must be ≤ image_guidance_end ({self.image_guidance_end:g}),"
                                     f" got {self.image_guidance_start:g}")
        one_of("sampler", self.sampler, SAMPLERS)
        one_of("uncond_references", self.uncond_references, UNCOND_REFERENCES)
        if self.guidance_steps is not None:
            set_("guidance_steps", whole_number("guidance_steps", self.guidance_steps, 0, self.steps))
        one_of("cache", self.cache, CACHES)
        if self.cache_threshold is not None:
            set_("cache_threshold", finite_number("cache_threshold", self.cache_threshold, 0.0, exclusive_minimum=True))
        if self.cache_interval is not None:
            set_("cache_interval", whole_number("cache_interval", self.cache_interval, 1, self.steps))
        if not isinstance(self.text_kv_cache, bool):
            raise RefAlignInputError(f"text_kv_cache: expected true or false, got {describe(self.text_kv_cache)}")

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

    def guidance_at(self, step: int) -> str:
        """The guidance mode of step `step` (0-based): one of GUIDANCE_MODES."""
        return guidance_mode(step, self.steps, self.guidance_steps, self.image_guidance_start,
                             self.image_guidance_end)

    def latent_shape(self, channels: int = 16) -> tuple[int, ...]:
        """Video latents `[1, C, (F−1)/4+1, H/8, W/8]`."""
        return (1, channels, (self.num_frames - 1) // 4 + 1, self.height // 8, self.width // 8)


# named sets of settings over a model's defaults; turbo: a distilled student's schedule (`training/distill.py`):
# a few Euler steps with the prompt pass alone (guidance baked in), at the model's own shift
PRESETS = {"turbo": {"steps": 4, "guidance_steps": 0, "sampler": "euler"}}


def with_preset(settings: SamplingSettings, preset: str | None) -> SamplingSettings:
    """`settings` with the named preset's values (None: unchanged)."""
    if preset is None:
        return settings
    one_of("preset", preset, tuple(PRESETS))
    return settings.replace(source=f"preset {preset}", **PRESETS[preset])


def three_pass_guidance(uncond, image_cond, text_cond, image_scale: float, text_scale: float):
    return uncond + image_scale * (image_cond - uncond) + text_scale * (text_cond - image_cond)


THREE_PASS, NO_IMAGE_PASS, PROMPT_ONLY = GUIDANCE_MODES = ("three_pass", "no_image_pass", "prompt_only")


def guidance_weights(image_scale: float, text_scale: float, mode: str = THREE_PASS) -> tuple[float, float, float]:
    """The guidance formula of a step as weights of (u, c_img, c_txt): three passes
    v = (1−s_img)·u + (s_img−s_txt)·c_img + s_txt·c_txt; outside the image-guidance window v = u + s_txt·(c_txt − u);
    after `guidance_steps` v = c_txt."""
    return {THREE_PASS: (1.0 - image_scale, image_scale - text_scale, text_scale),
            NO_IMAGE_PASS: (1.0 - text_scale, 0.0, text_scale),
            PROMPT_ONLY: (0.0, 0.0, 1.0)}[mode]


def guidance_mode(step: int, steps: int, guidance_steps: int | None = None, image_guidance_start: float = 0.0,
                  image_guidance_end: float = 1.0) -> str:
    """Step `step` (0-based) of `steps`: c_txt alone from `guidance_steps` on (None: never), the image pass inside
    image_guidance_start ≤ step / steps < image_guidance_end."""
    if guidance_steps is not None and step >= guidance_steps:
        return PROMPT_ONLY
    return THREE_PASS if image_guidance_start <= step / steps < image_guidance_end else NO_IMAGE_PASS


def step_at_sigma(sigma: float, step_sigmas: torch.Tensor) -> int:
    """The step (0-based) a guider that sees sigmas and not steps is on: step_sigmas are the sigmas the model is
    evaluated at, one per step, decreasing; a sigma between two of them belongs to the nearer one (samplers such as
    Heun evaluate in between)."""
    midpoints = (step_sigmas[:-1] + step_sigmas[1:]) / 2
    return int((midpoints > sigma).sum())


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


GENERIC_CAUSES = ("check the guidance scales, the prompt embeddings, the DiT weights and the LoRA strengths and "
                  "weights")


def run_schedule(scheduler, latents: torch.Tensor, velocity: Velocity, *, callback=None,
                 cancel_check=None, diagnose: Callable[[], str] | None = None) -> torch.Tensor:
    """Integrate the flow from `latents` (pure noise at σ = 1) to σ = 0 over the scheduler's steps.

    velocity(latents, timestep, sigma) -> v (timestep = 1000·σ); callback(step, steps, latents) after every step;
    cancel_check() before every step (True cancels). Latents that turn NaN or infinite stop the run with one error
    (the likely causes from `diagnose()`), so nothing black is ever decoded and saved."""
    steps = len(scheduler.timesteps)
    for i, t in enumerate(scheduler.timesteps):
        if cancel_check is not None and cancel_check():
            raise SamplingCancelled(f"cancelled before step {i + 1}/{steps}")
        v = velocity(latents, t, scheduler.sigmas[i])
        latents = scheduler.step(v, t, latents).prev_sample
        if not bool(torch.isfinite(latents).all()):
            causes = diagnose() if diagnose is not None else GENERIC_CAUSES
            raise RefAlignInputError(f"sampling: the latents became NaN or infinite at step {i + 1}/{steps}; {causes}")
        if callback is not None:
            callback(i + 1, steps, latents)
    return latents


def hold_known_frames(velocity: Velocity, known: torch.Tensor, noise: torch.Tensor,
                      multiplier: float = 1000.0) -> Velocity:
    """Flow-matching inpainting along time (extension): the first P latent frames are held at `known`
    `[1, C, P, h, w]` while the rest is denoised, as ComfyUI's noise mask does (`KSamplerX0Inpaint`): the model sees
    them noised to its sigma s = timestep / multiplier with the run's `noise`, s·noise + (1 − s)·known, and their x0
    is `known`, so their velocity is (latents − known) / σ at the scheduler's σ (UniPC rounds the timestep, so s is
    not σ there, and is 0 below σ = 0.0005)."""
    frames = known.shape[2]

    def held(latents, timestep, sigma):
        s = float(timestep) / multiplier
        x = latents.clone()
        x[:, :, :frames] = s * noise[:, :, :frames] + (1 - s) * known
        v = velocity(x, timestep, sigma).clone()
        v[:, :, :frames] = (latents[:, :, :frames] - known) / float(sigma)
        return v

    return held


def check_known_latents(known: torch.Tensor, latent_shape: tuple[int, ...]) -> None:
    """Known leading latent frames `[1, C, P, h, w]`, 1 ≤ P < the clip's latent frames, finite."""
    if known.ndim != 5 or known.shape[:2] != latent_shape[:2] or tuple(known.shape[3:]) != latent_shape[3:] \
            or not 1 <= known.shape[2] < latent_shape[2]:
        raise RefAlignInputError(f"known latents must be [1, {latent_shape[1]}, P, {latent_shape[3]}, "
                                 f"{latent_shape[4]}] with 1 ≤ P < {latent_shape[2]}, got {tuple(known.shape)}")
    if not bool(torch.isfinite(known).all()):
        raise RefAlignInputError("known latents have NaN or infinite values")


PASS_NAMES = ("uncond", "image", "text")


@dataclass
class _Pass:
    name: str
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


def _guidance_passes(prompt_embeds, negative_embeds, reference_latents, settings: SamplingSettings,
                     mode: str = THREE_PASS):
    """The passes with a non-zero weight in the guidance formula of a step."""
    # Zero-padded text tokens still enter cross-attention (as in Wan, which pads to 512), so both prompts get the
    # same length whether the passes run batched or one by one.
    prompt_embeds, negative_embeds = _pad_text([prompt_embeds, negative_embeds]).split(1)
    weights = guidance_weights(settings.image_scale, settings.text_scale, mode)
    inputs = ((negative_embeds, zero_references(reference_latents, settings.uncond_references)),
              (negative_embeds, reference_latents), (prompt_embeds, reference_latents))
    return [_Pass(name, w, text, refs) for name, w, (text, refs) in zip(PASS_NAMES, weights, inputs) if w != 0.0]


class _Velocity:
    """Runs a step's guidance passes, batched into one forward per reference shape when `batch_passes` (one pass
    per forward with a cache hook, which keeps a state per pass, and after an out-of-memory error). One per run: it
    owns the run's text K/V caches (with `text_kv_cache`), one per forward's group of passes."""

    def __init__(self, dit, schedule: dict[str, list[_Pass]], settings: SamplingSettings, batch_passes: bool,
                 calibration: MagCalibration | None = None):
        self.dit, self.schedule, self.settings, self.calibration = dit, schedule, settings, calibration
        self.cached = settings.cache != "none"
        self.batch = batch_passes and not self.cached
        self.step = 0
        self.text_kv: dict[str, TextKVCache] | None = {} if settings.text_kv_cache else None
        # passed only when it changes something: the default forward stays the one of every other run
        self.strength = {"reference_strength": settings.reference_strength} if settings.reference_strength != 1 else {}
        self.dtype = dit.patch_embedding.weight.dtype
        self.device = dit.patch_embedding.weight.device

    def _forward(self, latents, timestep, group: list[_Pass]) -> list[torch.Tensor]:
        n = len(group)
        name = "+".join(p.name for p in group)
        if self.calibration is not None:
            self.calibration.context = name
        context = self.dit.cache_context(name) if self.cached else contextlib.nullcontext()
        with context:
            out = self.dit(
                latents.to(self.device, self.dtype).expand(n, -1, -1, -1, -1),
                timestep.to(self.device).expand(n),
                torch.cat([p.text for p in group]).to(self.device, self.dtype),
                reference_latents=torch.cat([p.references for p in group]).to(self.device, self.dtype),
                text_kv=None if self.text_kv is None else self.text_kv.setdefault(name, TextKVCache()),
                **self.strength,
            ).sample
        return list(out.float().cpu().split(1))

    def __call__(self, latents: torch.Tensor, timestep: torch.Tensor, sigma=None) -> torch.Tensor:
        passes = self.schedule[self.settings.guidance_at(self.step)]
        self.step += 1
        if not passes:
            return torch.zeros_like(latents)
        timestep = timestep.float().reshape(1)
        outputs = {}
        if self.batch:
            groups: dict[tuple, list[int]] = {}
            for i, p in enumerate(passes):
                groups.setdefault(tuple(p.references.shape), []).append(i)
            try:
                for indices in groups.values():
                    outputs.update(zip(indices, self._forward(latents, timestep, [passes[i] for i in indices])))
            except torch.OutOfMemoryError:
                logger.warning("out of memory with batched guidance passes; running them one at a time")
                self.batch, outputs = False, {}
        if not self.batch:
            for i, p in enumerate(passes):
                outputs[i] = self._forward(latents, timestep, [p])[0]
        return sum(p.weight * outputs[i] for i, p in enumerate(passes))


def guided_velocity(dit, latents: torch.Tensor, timestep: torch.Tensor, prompt_embeds: torch.Tensor,
                    negative_prompt_embeds: torch.Tensor, reference_latents: torch.Tensor,
                    settings: SamplingSettings) -> torch.Tensor:
    """The velocity of one step with the three-pass guidance of `settings` (its scales and reference handling):
    latents `[1, C, T', h, w]`, timestep `[1]` (0–1000); returns fp32 on the CPU, as the sampler's steps get it."""
    passes = _guidance_passes(prompt_embeds.float(), negative_prompt_embeds.float(), reference_latents.float(),
                              settings)
    return _Velocity(dit, {THREE_PASS: passes}, settings.replace(image_guidance_start=0.0, image_guidance_end=1.0,
                                                                 guidance_steps=None), True)(latents, timestep)


def check_positions(settings: SamplingSettings, config, num_references: int) -> None:
    """The video (plus its references on the frame axis) within the DiT's RoPE positions, per axis
    (`rope_max_seq_len` of its config), checked before any work: past them the DiT fails deep inside."""
    limit = config["rope_max_seq_len"]
    p_t, p_h, p_w = config["patch_size"]
    latent_frames = settings.latent_shape()[2]
    frames = (latent_frames + num_references) // p_t
    if frames > limit:
        most = 4 * (limit * p_t - num_references - 1) + 1
        raise RefAlignInputError(
            f"num_frames {settings.num_frames} with {num_references} reference(s) needs {frames} temporal positions; "
            f"this DiT's RoPE has {limit} (rope_max_seq_len): at most {most} frames")
    for name, size, patch in (("width", settings.width, p_w), ("height", settings.height, p_h)):
        if size // 8 // patch > limit:
            raise RefAlignInputError(
                f"{name} {size} needs {size // 8 // patch} positions; this DiT's RoPE has {limit} per axis "
                f"(rope_max_seq_len): at most {limit * patch * 8}")


def check_text_embeddings(embeddings: dict[str, torch.Tensor | None], text_dim: int) -> None:
    """Each named embedding `[1, L, text_dim]` and finite (None: not given)."""
    for name, emb in embeddings.items():
        if emb is None:
            continue
        if emb.ndim != 3 or emb.shape[0] != 1 or emb.shape[2] != text_dim:
            raise RefAlignInputError(f"{name} must be [1, L, {text_dim}], got {tuple(emb.shape)}")
        if not bool(torch.isfinite(emb).all()):
            raise RefAlignInputError(f"{name} have NaN or infinite values")


def check_reference_latents(reference_latents: torch.Tensor, settings: SamplingSettings, channels: int) -> None:
    shape = settings.latent_shape(channels)
    if reference_latents.ndim != 5 or reference_latents.shape[0] != 1 or \
            tuple(reference_latents.shape[3:]) != shape[3:] or reference_latents.shape[1] != shape[1]:
        raise RefAlignInputError(
            f"reference latents must be [1, {shape[1]}, K, {shape[3]}, {shape[4]}] for "
            f"{settings.width}x{settings.height}, got {tuple(reference_latents.shape)}"
        )
    if not bool(torch.isfinite(reference_latents).all()):
        raise RefAlignInputError("reference latents have NaN or infinite values")


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
    mag_ratio_memo: dict | None = None,
    known_latents: torch.Tensor | None = None,
) -> torch.Tensor:
    """Generate video latents `[1, 16, (F−1)/4+1, H/8, W/8]` (fp32, CPU) with our DiT.

    prompt_embeds / negative_prompt_embeds: `[1, L, text_dim]`; reference_latents: clean `[1, 16, K, H/8, W/8]`.
    callback(step, steps, latents) runs after every step; cancel_check() before every step (True cancels).
    mag_ratio_memo: MagCache ratios calibrated on this DiT, by schedule and LoRAs, filled here; a caller that keeps
    it across runs calibrates once (None: calibrate for this run only). known_latents: clean leading latent frames
    `[1, 16, P, H/8, W/8]` held fixed while the rest is denoised (`hold_known_frames`; extension)."""
    mag_ratio_memo = {} if mag_ratio_memo is None else mag_ratio_memo
    check_reference_latents(reference_latents, settings, dit.config.in_channels)
    check_positions(settings, dit.config, reference_latents.shape[2])
    if known_latents is not None:
        check_known_latents(known_latents, settings.latent_shape(dit.config.in_channels))
        known_latents = known_latents.float().cpu()
    check_text_embeddings({"prompt embeddings": prompt_embeds, "negative prompt embeddings": negative_prompt_embeds},
                          dit.config.text_dim)
    texts = (prompt_embeds.float(), negative_prompt_embeds.float(), reference_latents.float())
    schedule = {mode: _guidance_passes(*texts, settings, mode) for mode in GUIDANCE_MODES}

    def diagnose() -> str:
        broken = first_non_finite(dit)
        if broken is not None:
            return f"the DiT weight {broken} has NaN or infinite values (a broken checkpoint or LoRA)"
        largest = max(float(t.abs().max()) for t in texts[:2])
        loras = ", ".join(f"{spec.path} at {spec.strength:g}" for spec in applied_loras(dit)) or "none"
        return (f"check the guidance scales (image_scale {settings.image_scale:g}, text_scale "
                f"{settings.text_scale:g}), the prompt embeddings (largest |value| {largest:.3g}) and the LoRAs "
                f"({loras})")

    def run(run_settings, callback=None, cancel_check=None, calibration=None):
        scheduler = make_scheduler(run_settings.sampler, run_settings.steps, run_settings.shift)
        latents = initial_noise(run_settings.latent_shape(dit.config.in_channels), run_settings.seed)
        velocity = _Velocity(dit, schedule, run_settings, batch_passes and calibration is None, calibration)
        if known_latents is not None:
            velocity = hold_known_frames(velocity, known_latents, latents)
        with dit_cache(dit, _cache_config(dit, run_settings, run, mag_ratio_memo, cancel_check)):
            latents = run_schedule(scheduler, latents, velocity, callback=callback, cancel_check=cancel_check,
                                   diagnose=diagnose)
        if known_latents is not None:
            latents[:, :, :known_latents.shape[2]] = known_latents
        return latents

    return run(settings, callback, cancel_check)


def _cache_config(dit, settings: SamplingSettings, run, memo: dict, cancel_check=None):
    mag_ratios = None
    if settings.cache == "magcache":
        # the ratios belong to these weights (LoRAs included) and this schedule
        key = (settings.sampler, settings.steps, settings.shift, settings.guidance_steps, settings.image_guidance_start,
               settings.image_guidance_end, settings.reference_strength, tuple(applied_loras(dit)))
        if key not in memo:
            logger.warning("MagCache: calibrating its magnitude ratios on this model (one uncached run of %d steps; "
                           "kept in mag_ratio_memo for this schedule)", settings.steps)
            calibration = MagCalibration(dit)
            try:
                run(settings.replace(cache="none", text_kv_cache=False), cancel_check=cancel_check,
                    calibration=calibration)
            finally:
                ratios = calibration.close()
            memo[key] = ratios  # only a finished calibration is kept
        mag_ratios = memo[key]
    return cache_config(settings.cache, settings.steps, settings.cache_threshold, settings.cache_interval, mag_ratios)

