"""A bundle's own VAE and text encoder (the embedded toy model's, or any bundle folder's) as ComfyUI VAE and CLIP
objects, so core nodes (CLIPTextEncode, VAE Encode / Decode) and ours take them as they take the Wan2.1 VAE and umT5.

Latents cross links in the Wan2.1 VAE's convention, as for every Wan model in ComfyUI: DiT space =
(z − mean_Wan2.1) / std_Wan2.1 (the `Wan21` latent format). A bundle VAE with its own statistics converts through DiT
space, so a native WAN21 MODEL gets exactly the DiT-space latents that the core path gives our DiT."""

import torch

from refalign_core.errors import RefAlignInputError
from refalign_core.inference.sampler import FRAMES_PER_LATENT, is_frame_count
from refalign_core.models.text_encoder import TextEncoder, encode_prompts
from refalign_core.models.vae import decode_latents, dit_to_wan21_space, encode_video, wan21_to_dit_space

from . import runtime

SPATIAL = 8  # pixels per latent cell, as the Wan2.1 VAE


class BundleVAE:
    """The VAE interface ComfyUI's nodes call. encode: pixels `[T, H, W, C]` in [0, 1] (T = 4n+1 frames of one
    video) -> `[1, C_z, n+1, H/8, W/8]`; decode: `[B, C_z, T', h, w]` -> `[B, 4(T'−1)+1, 8h, 8w, 3]` in [0, 1]."""

    latent_dim = 3
    downscale_ratio = (lambda t: max(0, (t + FRAMES_PER_LATENT - 1) // FRAMES_PER_LATENT), SPATIAL, SPATIAL)
    upscale_ratio = (lambda t: max(0, (t - 1) * FRAMES_PER_LATENT + 1), SPATIAL, SPATIAL)

    def __init__(self, vae: torch.nn.Module):
        self.vae = vae
        self.latent_channels = vae.config.z_dim
        self.patcher = runtime.managed_patcher(vae, runtime.torch_device(), torch.device("cpu"))

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        frames = pixels.shape[0]
        if pixels.ndim != 4 or not is_frame_count(frames):
            raise RefAlignInputError(f"VAE encode: pixels of shape {tuple(pixels.shape)}; expected [T, H, W, C] "
                                     f"with T = 4n+1 frames (1, 5, 9, …)")
        if pixels.shape[1] % SPATIAL or pixels.shape[2] % SPATIAL:
            raise RefAlignInputError(f"VAE encode: {pixels.shape[2]}x{pixels.shape[1]} pixels; width and height "
                                     f"must be multiples of {SPATIAL}")
        runtime.load_to_device(self.patcher)
        video = pixels[..., :3].permute(3, 0, 1, 2)[None].float().mul(2).sub(1)  # [1, 3, T, H, W]
        return dit_to_wan21_space(encode_video(self.vae, video))

    def decode(self, latents: torch.Tensor, vae_options=None) -> torch.Tensor:
        runtime.load_to_device(self.patcher)
        video = decode_latents(self.vae, wan21_to_dit_space(latents))  # [B, 3, T, H, W] in [-1, 1]
        return video.permute(0, 2, 3, 4, 1).add(1).div(2).float().to(runtime.intermediate_device())

    def encode_tiled(self, pixels, *args, **kwargs) -> torch.Tensor:
        return self.encode(pixels)

    def decode_tiled(self, latents, *args, **kwargs) -> torch.Tensor:
        return self.decode(latents)

    def spacial_compression_encode(self) -> int:
        return SPATIAL

    def spacial_compression_decode(self) -> int:
        return SPATIAL

    def temporal_compression_decode(self) -> int:
        return FRAMES_PER_LATENT

    def throw_exception_if_invalid(self) -> None:
        """Always valid (ComfyUI's VAE nodes call this first)."""


class BundleCLIP:
    """The CLIP interface CLIPTextEncode calls (`tokenize`, then `encode_from_tokens_scheduled`): the bundle's text
    encoder, giving the `[1, L, dim]` embeddings the core path gives (zero-padded to the bundle's text length)."""

    def __init__(self, text_encoder: TextEncoder):
        self.text_encoder = text_encoder
        self.patcher = runtime.managed_patcher(text_encoder.model, runtime.torch_device(), torch.device("cpu"))

    def tokenize(self, text: str, **kwargs) -> dict:
        return {"text": text}

    def encode_from_tokens(self, tokens: dict, return_pooled=False, return_dict=False):
        runtime.load_to_device(self.patcher)
        embeddings = encode_prompts(self.text_encoder, [tokens["text"]]).to(runtime.intermediate_device())
        if return_dict:
            return {"cond": embeddings, "pooled_output": None}
        return (embeddings, None) if return_pooled else embeddings

    def encode_from_tokens_scheduled(self, tokens: dict, unprojected=False, add_dict=None, show_pbar=True) -> list:
        return [[self.encode_from_tokens(tokens), dict(add_dict or {})]]
