"""Precomputed training inputs, so a training step runs no VAE, text encoder or VFM.

Per manifest entry, one safetensors file with
  video_latents      [16, T', h, w]          one clip window (normalised VAE latents)
  prompt_embeds      [L, text_dim]           the caption's tokens only (zero-padded at use)
  reference_latents  [A, K, 16, h, w]        A augmented copies of the K references, each a 1-frame VAE encode
  reference_images   [A, K, 3, H, W] uint8   the augmented, white-padded images the VAE and the VFM saw
  vfm_tokens         [A, K·T, vfm_dim]       VFM features on the DiT reference-token grid (T = H/16 · W/16)
plus `null_prompt.safetensors` (the empty prompt, for CFG dropout) and `cache.json` (settings, counts)."""

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from .data import ReferenceAugmentation, SkipCounter, load_video_clip, read_manifest
from .errors import RefAlignInputError
from .references import encode_references, fit_on_white
from .safetensors_io import read_safetensors, write_safetensors
from .text_encoder import encode_prompts
from .vae import encode_video
from .video_io import load_image

logger = logging.getLogger(__name__)
CACHE_FILE = "cache.json"
CACHE_VERSION = 1


@dataclass
class CacheSettings:
    width: int
    height: int
    num_frames: int
    fps: float | None
    augment_copies: int = 4
    seed: int = 0
    vfm_dtype: str = "float16"


def _reference_images(entry, settings: CacheSettings) -> torch.Tensor:
    images = []
    for ref in entry.references:
        mask = load_image(ref.mask).convert("L") if ref.mask else None
        images.append(fit_on_white(load_image(ref.image), settings.width, settings.height, mask=mask))
    return torch.stack(images)  # [K, 3, H, W] in [0, 1]


@torch.no_grad()
def build_cache(manifest: str | os.PathLike, cache_dir: str | os.PathLike, settings: CacheSettings, vae,
                text_encoder, vfm, progress: bool = True) -> Path:
    """Encode every entry of `manifest` into `cache_dir`; unreadable entries are skipped, counted and logged."""
    cache_dir = Path(cache_dir)
    (cache_dir / "samples").mkdir(parents=True, exist_ok=True)
    skipped = SkipCounter()
    entries = read_manifest(manifest, skipped)
    augment = ReferenceAugmentation()
    write_safetensors({"prompt_embeds": _trim(encode_prompts(text_encoder, [""])[0])}, cache_dir / "null_prompt.safetensors")
    written = 0
    for index, entry in enumerate(tqdm(entries, desc="caching", disable=not progress)):
        generator = torch.Generator().manual_seed(settings.seed * 1_000_003 + index)
        try:
            clip = load_video_clip(entry.video, settings.num_frames, settings.fps, settings.height, settings.width,
                                   generator)
            references = _reference_images(entry, settings)
        except (OSError, ValueError, RuntimeError) as e:  # missing / corrupt files, too-short videos
            skipped.skip(f"{entry.video} (manifest line {entry.line})", e)
            continue
        copies = [augment(references, generator) for _ in range(settings.augment_copies)]
        latents = torch.stack([encode_references(vae, c)[0].transpose(0, 1) for c in copies])  # [A, K, 16, h, w]
        tokens = torch.stack([vfm(c).flatten(0, 1) for c in copies])  # [A, K·T, D]
        write_safetensors({
            "video_latents": encode_video(vae, clip[None])[0].float().cpu(),
            "prompt_embeds": _trim(encode_prompts(text_encoder, [entry.caption])[0]),
            "reference_latents": latents.float().cpu(),
            "reference_images": (torch.stack(copies) * 255).round().to(torch.uint8),
            "vfm_tokens": tokens.to(getattr(torch, settings.vfm_dtype)).cpu(),
        }, cache_dir / "samples" / f"{written:06d}.safetensors")
        written += 1
    if written == 0:
        raise RefAlignInputError(f"dataset {manifest}: no usable entries ({skipped.total} skipped: {skipped.reasons})")
    info = {"version": CACHE_VERSION, "manifest": str(manifest), "samples": written, "skipped": skipped.total,
            "skipped_reasons": skipped.reasons, "vfm_dim": int(tokens.shape[-1]), "settings": settings.__dict__}
    (cache_dir / CACHE_FILE).write_text(json.dumps(info, indent=1))
    logger.info("cached %d samples into %s (%d skipped)", written, cache_dir, skipped.total)
    return cache_dir


def _trim(embeds: torch.Tensor) -> torch.Tensor:
    """Drop the zero padding (the encoder zeroes every position past the prompt's tokens)."""
    length = int((embeds.abs().sum(-1) > 0).nonzero().max()) + 1 if embeds.abs().sum() > 0 else 1
    return embeds[:length].contiguous()


class FeatureCache:
    """Read access to a built cache."""

    def __init__(self, cache_dir: str | os.PathLike):
        self.dir = Path(cache_dir)
        info_path = self.dir / CACHE_FILE
        if not info_path.is_file():
            raise RefAlignInputError(f"feature cache {self.dir} is not built (no {CACHE_FILE})")
        self.info = json.loads(info_path.read_text())
        self.null_prompt = read_safetensors(self.dir / "null_prompt.safetensors", "cache")[0]["prompt_embeds"]

    def __len__(self) -> int:
        return self.info["samples"]

    @property
    def vfm_dim(self) -> int:
        return self.info["vfm_dim"]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return read_safetensors(self.dir / "samples" / f"{index:06d}.safetensors", "cache")[0]
