"""R2V generation in one place: `generate` runs encode references → sample → decode for any denoiser (our DiT,
or ComfyUI's native model in `nodes/`) and any VAE codec. `load_pipeline(PipelineSpec)` builds a `RefAlignPipeline`
(a DiT + optional VAE + optional umT5, from files or a bundle folder); without a VAE or text encoder it still runs
from precomputed latents / embeddings."""

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import torch

from ..errors import RefAlignInputError
from ..models.checkpoint import load_dit, save_dit
from ..models.lora import LoraSpec, apply_loras
from ..models.text_encoder import WAN_NEGATIVE_PROMPT, TextEncoder, encode_prompts, load_text_encoder
from ..models.vae import decode_latents, encode_video, latent_stats, load_vae, save_vae
from .acceleration import compile_blocks, set_attention_backend
from .bundles import DEFAULT_FPS, read_bundle, write_bundle_manifest
from .extension import Extension, generate_segments
from .memory import check_memory, memory_estimate
from .references import MAX_REFERENCES, as_references, encode_references, prepare_references
from .sampler import SamplingSettings, sample_r2v


@dataclass
class GenerationResult:
    latents: torch.Tensor  # [S, 16, T', H/8, W/8] in the DiT's (normalised) latent space, one clip per segment
    frames: torch.Tensor | None  # [F, H, W, 3] in [0,1] (ComfyUI IMAGE layout; segments joined), None without a VAE
    references: torch.Tensor | None  # [K, 3, H, W] the fitted, white-padded references, if images were given


class Denoiser(Protocol):
    """(text, reference latents `[1,C,K,h,w]`, settings) -> video latents `[1,C,T',h,w]`, both in DiT space;
    known_latents `[1,C,P,h,w]`: leading latent frames held fixed (extension)."""

    def __call__(self, text: Any, reference_latents: torch.Tensor, settings: SamplingSettings, *,
                 callback: Callable | None = None, cancel_check: Callable | None = None,
                 known_latents: torch.Tensor | None = None) -> torch.Tensor: ...


class VideoCodec(Protocol):
    """The VAE side of generation, in the DiT's normalised latent space."""

    def encode_references(self, fitted: torch.Tensor) -> torch.Tensor: ...  # [K,3,H,W] in [0,1] -> [1,C,K,h,w]

    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...  # [1,C,T',h,w] -> frames [F,H,W,3] in [0,1]

    def encode_video(self, frames: torch.Tensor) -> torch.Tensor: ...  # frames [4n+1,H,W,3] -> [1,C,n+1,h,w]

    def to_vae_space(self, latents: torch.Tensor) -> torch.Tensor: ...  # DiT space -> the VAE's own latent space


@dataclass
class DiTDenoiser:
    """Our reference DiT sampled by `sample_r2v`; text is `(prompt_embeds, negative_prompt_embeds)`.
    mag_ratio_memo: MagCache calibrations to reuse (see `sample_r2v`); None: each run calibrates its own."""

    dit: torch.nn.Module
    batch_passes: bool = True
    mag_ratio_memo: dict | None = None

    def __call__(self, text, reference_latents, settings, *, callback=None, cancel_check=None,
                 known_latents=None) -> torch.Tensor:
        prompt_embeds, negative_embeds = text
        return sample_r2v(self.dit, prompt_embeds, negative_embeds, reference_latents, settings,
                          batch_passes=self.batch_passes, callback=callback, cancel_check=cancel_check,
                          mag_ratio_memo=self.mag_ratio_memo, known_latents=known_latents)


@dataclass
class VAECodec:
    """A core VAE (`AutoencoderKLWan` or the toy VAE) with its own latent mean / std."""

    vae: torch.nn.Module

    def encode_references(self, fitted: torch.Tensor) -> torch.Tensor:
        return encode_references(self.vae, fitted)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        video = decode_latents(self.vae, latents)  # [1, 3, F, H, W] in [-1, 1]
        return video[0].permute(1, 2, 3, 0).add(1).div(2).float().cpu()

    def encode_video(self, frames: torch.Tensor) -> torch.Tensor:
        return encode_video(self.vae, frames.permute(3, 0, 1, 2)[None].mul(2).sub(1)).float().cpu()

    def to_vae_space(self, latents: torch.Tensor) -> torch.Tensor:
        mean, std = latent_stats(self.vae, latents)
        return latents * std + mean


def generate(denoiser: Denoiser, codec: VideoCodec | None, text, settings: SamplingSettings, *, references=None,
             reference_latents: torch.Tensor | None = None, extension: Extension = Extension(), callback=None,
             cancel_check=None, decode: bool = True) -> GenerationResult:
    """Fit the references on white and encode each alone (unless `reference_latents` are given), sample, decode.

    references: `Reference`s or images (1–4); text: whatever the denoiser takes (embeddings for our DiT,
    CONDITIONING for ComfyUI's model); extension: more than one segment (`extension.py`; decodes)."""
    extension.check(settings)
    fitted = None
    if reference_latents is None:
        if references is None:
            raise RefAlignInputError("references: give reference images or reference latents")
        if codec is None:
            raise RefAlignInputError("references: this model has no VAE; pass reference latents instead")
        fitted = prepare_references(references, settings.width, settings.height, max_references=MAX_REFERENCES)
        reference_latents = codec.encode_references(fitted)
    if extension.segments > 1:
        latents, frames = generate_segments(denoiser, codec, text, settings, reference_latents, extension,
                                            callback=callback, cancel_check=cancel_check)
        return GenerationResult(latents=latents, frames=frames, references=fitted)
    latents = denoiser(text, reference_latents, settings, callback=callback, cancel_check=cancel_check)
    frames = codec.decode(latents) if decode and codec is not None else None
    return GenerationResult(latents=latents, frames=frames, references=fitted)


@dataclass(frozen=True)
class PipelineSpec:
    """What `load_pipeline` builds: a bundle folder, or DiT / VAE / text-encoder files, and how they run.

    settings / fps: the generation defaults (None: the bundle's, else the official ones); weight_dtype: storage of
    the DiT weights (None: compute_dtype); vae_tiling: decode in overlapping spatial tiles (diffusers' VAE tiling) to
    bound decoder memory; loras: applied and fused (`RefAlignPipeline.set_loras` switches them); attention_backend:
    see `acceleration.py`; compile: regional `torch.compile` of the DiT blocks."""

    bundle: str | os.PathLike | None = None
    dit: str | os.PathLike | None = None
    vae: str | os.PathLike | None = None
    text_encoder: str | os.PathLike | None = None
    settings: SamplingSettings | None = None
    fps: float | None = None
    device: str | torch.device = "cpu"
    compute_dtype: torch.dtype = torch.float32
    weight_dtype: torch.dtype | None = None
    vae_tiling: bool = False
    loras: tuple[LoraSpec, ...] = ()
    attention_backend: str = "native"
    compile: bool = False

    def model_files(self) -> tuple:
        """(dit, vae, text_encoder, settings, fps) with the bundle's read in: checkable before anything loads."""
        if self.bundle is not None:
            given = [name for name in ("dit", "vae", "text_encoder") if getattr(self, name) is not None]
            if given:
                raise RefAlignInputError(f"{', '.join(given)}: a bundle folder names its own model files; give the "
                                         "bundle or the files, not both")
            bundle = read_bundle(self.bundle)
            return (bundle.dit, bundle.vae, bundle.text_encoder, self.settings or bundle.settings,
                    bundle.fps if self.fps is None else self.fps)
        if self.dit is None:
            raise RefAlignInputError("dit: required (a DiT .safetensors, or a bundle folder)")
        return (self.dit, self.vae, self.text_encoder, self.settings or SamplingSettings(),
                DEFAULT_FPS if self.fps is None else self.fps)


def load_pipeline(spec: PipelineSpec) -> "RefAlignPipeline":
    """The one loader of the core's models, for the CLI, the API and the benchmarks."""
    dit, vae, text_encoder, settings, fps = spec.model_files()
    vae_model = load_vae(vae, dtype=spec.compute_dtype, device=spec.device) if vae else None
    if vae_model is not None and spec.vae_tiling:
        if not hasattr(vae_model, "enable_tiling"):
            raise RefAlignInputError(f"vae_tiling: {vae} is a {type(vae_model).__name__}, which has no tiled "
                                     "decoding (only the Wan2.1 VAE has)")
        vae_model.enable_tiling()
    dit_model = load_dit(dit, compute_dtype=spec.compute_dtype, weight_dtype=spec.weight_dtype, device=spec.device)
    if spec.loras:
        apply_loras(dit_model, spec.loras)
    set_attention_backend(dit_model, spec.attention_backend, spec.device)
    if spec.compile:
        compile_blocks(dit_model)
    text = load_text_encoder(text_encoder, dtype=spec.compute_dtype, device=spec.device) if text_encoder else None
    return RefAlignPipeline(dit=dit_model, vae=vae_model, text_encoder=text, settings=settings, fps=fps)


@dataclass
class RefAlignPipeline:
    dit: torch.nn.Module
    vae: torch.nn.Module | None = None
    text_encoder: TextEncoder | None = None
    settings: SamplingSettings = field(default_factory=SamplingSettings)
    fps: float = DEFAULT_FPS
    mag_ratio_memo: dict = field(default_factory=dict, repr=False)  # MagCache calibrations of this pipeline's DiT

    @classmethod
    def from_files(cls, dit, vae=None, text_encoder=None, **options) -> "RefAlignPipeline":
        """`load_pipeline` on model files; `options`: the other `PipelineSpec` fields."""
        return load_pipeline(PipelineSpec(dit=dit, vae=vae, text_encoder=text_encoder, **options))

    @classmethod
    def from_bundle(cls, folder: str | os.PathLike, **options) -> "RefAlignPipeline":
        """`load_pipeline` on a bundle folder (see `bundles.py`): its DiT, VAE, text encoder and generation
        defaults; `options`: the other `PipelineSpec` fields."""
        return load_pipeline(PipelineSpec(bundle=folder, **options))

    def set_loras(self, loras: tuple[LoraSpec, ...]) -> None:
        """Replace the applied LoRAs (unfused first); an empty list returns to the base weights."""
        apply_loras(self.dit, loras)

    def save_bundle(self, folder: str | os.PathLike) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_dit(self.dit, folder / "dit.safetensors")
        if self.vae is not None:
            save_vae(self.vae, folder / "vae.safetensors")
        if self.text_encoder is not None:
            self.text_encoder.model.save_pretrained(folder / "text_encoder", safe_serialization=True)
            self.text_encoder.tokenizer.save_pretrained(folder / "text_encoder")
        write_bundle_manifest(folder, self.settings, self.fps, vae=self.vae is not None,
                              text_encoder=self.text_encoder is not None)
        return folder

    def encode_prompt(self, prompts: list[str]) -> torch.Tensor:
        if self.text_encoder is None:
            raise RefAlignInputError("prompt: this model has no text encoder; pass prompt embeddings instead")
        return encode_prompts(self.text_encoder, prompts)

    def encode_text(self, prompt=None, negative_prompt=WAN_NEGATIVE_PROMPT, prompt_embeds=None,
                    negative_prompt_embeds=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt, negative) embeddings `[1, L, text_dim]` each, from text (one text-encoder call) or as given; a
        missing negative without a text encoder is all zeros."""
        if prompt_embeds is None:
            if prompt is None:
                raise RefAlignInputError("prompt: give a prompt or prompt embeddings")
            prompt_embeds, negative_prompt_embeds = self.encode_prompt([prompt, negative_prompt or ""]).split(1)
        elif negative_prompt_embeds is None:
            negative_prompt_embeds = (self.encode_prompt([negative_prompt or ""]) if self.text_encoder is not None
                                      else torch.zeros_like(prompt_embeds))
        return prompt_embeds, negative_prompt_embeds

    def __call__(self, prompt: str | None = None, references=None, *, negative_prompt=WAN_NEGATIVE_PROMPT,
                 prompt_embeds=None, negative_prompt_embeds=None, reference_latents=None,
                 settings: SamplingSettings | None = None, extension: Extension = Extension(), decode: bool = True,
                 callback=None, cancel_check=None, batch_passes: bool = True, **overrides) -> GenerationResult:
        """Generate. references: `Reference`s or images (1–4). settings: default = the model's; `overrides` are
        `SamplingSettings` fields (seed, steps, …) applied on top, validated. extension: a video of several
        segments (`Extension(segments=3, overlap=5)`)."""
        settings = (settings or self.settings).replace(**overrides)
        if reference_latents is None and references is not None:
            references = as_references(references)
        count = reference_latents.shape[2] if reference_latents is not None else len(references or ())
        weight = self.dit.patch_embedding.weight
        extension.check(settings)
        check_memory(settings, memory_estimate(settings, self.dit.config, count, compute_dtype=weight.dtype,
                                               decode=decode and self.vae is not None, batch_passes=batch_passes,
                                               device=str(weight.device), extension=extension),
                     count, str(weight.device))
        text = self.encode_text(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds)
        codec = VAECodec(self.vae) if self.vae is not None else None
        return generate(DiTDenoiser(self.dit, batch_passes, self.mag_ratio_memo), codec, text, settings,
                        references=references, reference_latents=reference_latents, extension=extension,
                        callback=callback, cancel_check=cancel_check, decode=decode)
