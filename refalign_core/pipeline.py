"""RefAlignPipeline: DiT + (optional) VAE + (optional) umT5, from files or a bundle folder; prompt + reference
images -> video frames. Without a VAE or text encoder it still runs from precomputed latents / embeddings."""

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoint import load_dit, save_dit
from .errors import RefAlignInputError
from .references import encode_references, prepare_references
from .sampler import sample_r2v
from .text_encoder import WAN_NEGATIVE_PROMPT, TextEncoder, encode_prompts, load_text_encoder
from .vae import decode_latents, load_vae, save_vae

BUNDLE_FILE = "refalign_bundle.json"
GENERATION_DEFAULTS = dict(width=832, height=480, num_frames=81, steps=50, shift=5.0, image_scale=5.0,
                           text_scale=7.5, sampler="euler", fps=16)


@dataclass
class GenerationResult:
    latents: torch.Tensor  # [1, 16, T', H/8, W/8]
    frames: torch.Tensor | None  # [F, H, W, 3] in [0,1] (ComfyUI IMAGE layout), None without a VAE
    references: torch.Tensor | None  # [K, 3, H, W] the fitted, white-padded references, if images were given


@dataclass
class RefAlignPipeline:
    dit: torch.nn.Module
    vae: torch.nn.Module | None = None
    text_encoder: TextEncoder | None = None
    defaults: dict = field(default_factory=lambda: dict(GENERATION_DEFAULTS))

    @classmethod
    def from_files(cls, dit, vae=None, text_encoder=None, *, compute_dtype=torch.float32, weight_dtype=None,
                   device="cpu", vae_tiling=False, defaults=None) -> "RefAlignPipeline":
        """vae_tiling: decode in overlapping spatial tiles (diffusers' VAE tiling) to bound decoder memory."""
        vae_model = load_vae(vae, dtype=compute_dtype, device=device) if vae else None
        if vae_model is not None and vae_tiling:
            if not hasattr(vae_model, "enable_tiling"):
                raise RefAlignInputError(f"vae_tiling: {vae} is a {type(vae_model).__name__}, which has no tiled "
                                         "decoding (only the Wan2.1 VAE has)")
            vae_model.enable_tiling()
        return cls(
            dit=load_dit(dit, compute_dtype=compute_dtype, weight_dtype=weight_dtype, device=device),
            vae=vae_model,
            text_encoder=load_text_encoder(text_encoder, dtype=compute_dtype, device=device) if text_encoder else None,
            defaults={**GENERATION_DEFAULTS, **(defaults or {})},
        )

    @classmethod
    def from_bundle(cls, folder: str | os.PathLike, **kwargs) -> "RefAlignPipeline":
        """A bundle folder: `refalign_bundle.json` naming the DiT, VAE and text-encoder paths (relative to it) and
        generation defaults for the model."""
        folder = Path(folder)
        manifest_path = folder / BUNDLE_FILE
        if not manifest_path.is_file():
            raise RefAlignInputError(f"bundle: {folder} has no {BUNDLE_FILE}")
        manifest = json.loads(manifest_path.read_text())
        paths = {k: folder / manifest[k] if manifest.get(k) else None for k in ("dit", "vae", "text_encoder")}
        if paths["dit"] is None:
            raise RefAlignInputError(f"bundle: {manifest_path} names no 'dit'")
        return cls.from_files(paths["dit"], paths["vae"], paths["text_encoder"],
                              defaults=manifest.get("defaults"), **kwargs)

    def save_bundle(self, folder: str | os.PathLike) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_dit(self.dit, folder / "dit.safetensors")
        manifest = {"format": "refalign-bundle", "version": 1, "dit": "dit.safetensors", "defaults": self.defaults}
        if self.vae is not None:
            save_vae(self.vae, folder / "vae.safetensors")
            manifest["vae"] = "vae.safetensors"
        if self.text_encoder is not None:
            self.text_encoder.model.save_pretrained(folder / "text_encoder", safe_serialization=True)
            self.text_encoder.tokenizer.save_pretrained(folder / "text_encoder")
            manifest["text_encoder"] = "text_encoder"
        (folder / BUNDLE_FILE).write_text(json.dumps(manifest, indent=1))
        return folder

    def encode_prompt(self, prompts: list[str]) -> torch.Tensor:
        if self.text_encoder is None:
            raise RefAlignInputError("prompt: this model has no text encoder; pass prompt embeddings instead")
        return encode_prompts(self.text_encoder, prompts)

    def prepare_references(self, images, width: int, height: int, masks=None):
        """images -> (fitted references `[K,3,H,W]` in [0,1], latents `[1,16,K,H/8,W/8]`)."""
        if self.vae is None:
            raise RefAlignInputError("references: this model has no VAE; pass reference latents instead")
        fitted = prepare_references(images, width, height, masks)
        return fitted, encode_references(self.vae, fitted)

    def __call__(self, prompt: str | None = None, references=None, *, masks=None, negative_prompt=WAN_NEGATIVE_PROMPT,
                 prompt_embeds=None, negative_prompt_embeds=None, reference_latents=None, decode: bool = True,
                 **options) -> GenerationResult:
        """Generate. `options` are `sample_r2v` keywords (width, height, num_frames, steps, shift, image_scale,
        text_scale, sampler, seed, uncond_references, batch_passes, callback, cancel_check); missing ones come from
        the model's defaults."""
        settings = {k: v for k, v in self.defaults.items() if k != "fps"}
        settings.update(options)
        if prompt_embeds is None:
            if prompt is None:
                raise RefAlignInputError("prompt: give a prompt or prompt embeddings")
            prompt_embeds, negative_prompt_embeds = self.encode_prompt([prompt, negative_prompt or ""]).split(1)
        elif negative_prompt_embeds is None:
            negative_prompt_embeds = (self.encode_prompt([negative_prompt or ""]) if self.text_encoder is not None
                                      else torch.zeros_like(prompt_embeds))
        fitted = None
        if reference_latents is None:
            if references is None:
                raise RefAlignInputError("references: give reference images or reference latents")
            fitted, reference_latents = self.prepare_references(references, settings["width"], settings["height"], masks)
        latents = sample_r2v(self.dit, prompt_embeds, negative_prompt_embeds, reference_latents, **settings)
        frames = None
        if decode and self.vae is not None:
            video = decode_latents(self.vae, latents)  # [1, 3, F, H, W] in [-1, 1]
            frames = video[0].permute(1, 2, 3, 0).add(1).div(2).float().cpu()
        return GenerationResult(latents=latents, frames=frames, references=fitted)
