"""A small video autoencoder for the embedded toy model, with the Wan2.1 VAE's latent layout: `[B, 3, T, H, W]` with
T = 4n+1 <-> `[B, 16, n+1, H/8, W/8]`, latent frame 0 holding frame 0 and latent frame j ≥ 1 holding frames
4j−3 … 4j (causal, so a reference is a 1-frame clip as with Wan).

Each group of four frames is one 2-D image with 12 channels (frame 0 is repeated four times to form its own group),
encoded and decoded by plain 2-D convolutions. The Wan2.1 VAE's causal 3-D convolutions train far too slowly on a
CPU for the toy recipe's time budget; this model reaches a sharp reconstruction of toy clips in minutes. It is not a
substitute for the Wan2.1 VAE on real video."""

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput, IdentityDistribution
from diffusers.models.modeling_outputs import AutoencoderKLOutput
from diffusers.models.modeling_utils import ModelMixin
from einops import rearrange
from torch import nn

FRAMES_PER_LATENT = 4


class _ResidualBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return x + self.conv2(nn.functional.silu(self.conv1(nn.functional.silu(x))))


class ToyVideoVAE(ModelMixin, ConfigMixin):
    """block_channels: widths at full, 1/2, 1/4 and 1/8 resolution. latents_mean / latents_std: per-channel
    statistics of the training latents (DiT space = (z − mean) / std), as in diffusers' `AutoencoderKLWan` config."""

    @register_to_config
    def __init__(self, z_dim: int = 16, block_channels: tuple[int, ...] = (32, 64, 96, 96),
                 latents_mean: list[float] | None = None, latents_std: list[float] | None = None):
        super().__init__()
        group = 3 * FRAMES_PER_LATENT
        c = list(block_channels)
        encoder = [nn.Conv2d(group, c[0], 3, padding=1), _ResidualBlock(c[0])]
        for c_in, c_out in zip(c[:-1], c[1:]):
            encoder += [nn.SiLU(), nn.Conv2d(c_in, c_out, 4, stride=2, padding=1), _ResidualBlock(c_out)]
        self.encoder = nn.Sequential(*encoder, nn.SiLU(), nn.Conv2d(c[-1], z_dim, 1))
        decoder = [nn.Conv2d(z_dim, c[-1], 3, padding=1), _ResidualBlock(c[-1])]
        for c_in, c_out in zip(c[:0:-1], c[-2::-1]):
            decoder += [nn.Upsample(scale_factor=2.0, mode="nearest"), nn.Conv2d(c_in, c_out, 3, padding=1),
                        _ResidualBlock(c_out)]
        self.decoder = nn.Sequential(*decoder, nn.SiLU(), nn.Conv2d(c[0], group, 3, padding=1))

    def encode(self, video: torch.Tensor) -> AutoencoderKLOutput:
        """video `[B, 3, 4n+1, H, W]` in [-1, 1] -> latents `[B, z_dim, n+1, H/8, W/8]` (unnormalised)."""
        if video.shape[2] % FRAMES_PER_LATENT != 1:
            raise ValueError(f"video has {video.shape[2]} frames; the toy VAE needs 4n+1")
        first = video[:, :, :1].expand(-1, -1, FRAMES_PER_LATENT - 1, -1, -1)
        groups = rearrange(torch.cat([first, video], 2), "b c (n f) h w -> (b n) (f c) h w", f=FRAMES_PER_LATENT)
        z = self.encoder(groups)
        return AutoencoderKLOutput(latent_dist=IdentityDistribution(rearrange(z, "(b n) c h w -> b c n h w",
                                                                              b=video.shape[0])))

    def decode(self, latents: torch.Tensor) -> DecoderOutput:
        """latents `[B, z_dim, n+1, h, w]` (unnormalised) -> video `[B, 3, 4n+1, 8h, 8w]`."""
        groups = self.decoder(rearrange(latents, "b c n h w -> (b n) c h w"))
        video = rearrange(groups, "(b n) (f c) h w -> b c (n f) h w", b=latents.shape[0], f=FRAMES_PER_LATENT)
        return DecoderOutput(sample=video[:, :, FRAMES_PER_LATENT - 1:])
