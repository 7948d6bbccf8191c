"""Latent previews: a linear latent -> RGB map fitted on the model's own VAE, so it needs no decode per step and no
per-VAE table. Fit: encode a few images of random colour blocks (each reference alone, as the sampler does), then
least squares from the 16 latent channels (+1) to the 8x8-pooled RGB of the same pixels."""

import weakref

import numpy as np
import torch
from PIL import Image

FIT_SIZE = 64
FIT_IMAGES = 4


def fit_latent_rgb(codec, seed: int = 0) -> torch.Tensor:
    """`[C + 1, 3]` weights W so that rgb ≈ [z, 1] @ W for one latent pixel z (DiT latent space), rgb in [0, 1].
    codec: anything with `encode_references([K,3,H,W] in [0,1]) -> [1,C,K,H/8,W/8]`."""
    g = torch.Generator().manual_seed(seed)
    blocks = torch.rand(FIT_IMAGES, 3, FIT_SIZE // 16, FIT_SIZE // 16, generator=g)
    images = blocks.repeat_interleave(16, dim=2).repeat_interleave(16, dim=3)
    with torch.no_grad():
        latents = codec.encode_references(images).float()[0]  # [C, K, h, w]
    target = torch.nn.functional.avg_pool2d(images, 8)  # [K, 3, h, w]
    z = latents.permute(1, 2, 3, 0).reshape(-1, latents.shape[0])
    design = torch.cat([z, torch.ones(len(z), 1)], dim=1).double()
    rgb = target.permute(0, 2, 3, 1).reshape(-1, 3).double()
    return torch.linalg.lstsq(design, rgb, rcond=None).solution.float()


def preview_image(latents: torch.Tensor, weights: torch.Tensor, frame: int = -1) -> Image.Image:
    """One latent frame of `[1, C, T, h, w]` (DiT space) as an RGB image at latent resolution."""
    z = latents[0, :, frame].float().cpu().permute(1, 2, 0)  # [h, w, C]
    rgb = torch.cat([z, torch.ones(*z.shape[:2], 1)], dim=-1) @ weights
    return Image.fromarray((rgb.clamp(0, 1).numpy() * 255).round().astype(np.uint8))


_FITTED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def latent_rgb_weights(codec) -> torch.Tensor:
    """`fit_latent_rgb`, fitted once per VAE (codecs that wrap the same VAE share it)."""
    vae = getattr(codec, "vae", None) or getattr(getattr(codec, "codec", None), "vae", None)
    try:
        if vae is not None and vae in _FITTED:
            return _FITTED[vae]
    except TypeError:  # not weak-referenceable / hashable
        return fit_latent_rgb(codec)
    weights = fit_latent_rgb(codec)
    if vae is not None:
        _FITTED[vae] = weights
    return weights


class LatentPreview:
    """A step callback `(step, steps, latents)` that hands `sink(step, steps, image)` a preview of the latest
    latent frame; the latent -> RGB map is fitted on first use (once per VAE)."""

    def __init__(self, codec, sink, upscale: int = 8):
        self.codec, self.sink, self.upscale, self.weights = codec, sink, upscale, None

    def __call__(self, step: int, steps: int, latents: torch.Tensor) -> None:
        if self.weights is None:
            self.weights = latent_rgb_weights(self.codec)
        image = preview_image(latents, self.weights)
        if self.upscale > 1:
            image = image.resize((image.width * self.upscale, image.height * self.upscale), Image.BILINEAR)
        self.sink(step, steps, image)
