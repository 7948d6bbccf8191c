"""ToyVideoVAE: the Wan2.1 latent layout (causal 4× time, 8× space), save / load through the core VAE loader."""

import pytest
import torch

from refalign_core.errors import RefAlignInputError
from refalign_core.inference.pipeline import RefAlignPipeline
from tiny_models import tiny_dit
from refalign_core.toy.vae import ToyVideoVAE
from refalign_core.models.vae import decode_latents, encode_video, load_vae, save_vae


def toy_vae(seed=0):
    torch.manual_seed(seed)
    return ToyVideoVAE(block_channels=(8, 8, 16, 16), latents_mean=[0.1] * 16, latents_std=[2.0] * 16).eval()


@torch.no_grad()
def test_latent_layout_matches_wan_and_is_causal():
    vae = toy_vae()
    video = torch.rand(2, 3, 17, 32, 48) * 2 - 1
    latents = vae.encode(video).latent_dist.mode()
    assert latents.shape == (2, 16, 5, 4, 6)
    assert vae.decode(latents).sample.shape == (2, 3, 17, 32, 48)
    changed = video.clone()
    changed[:, :, 6] = 0  # frame 6 belongs to latent frame 2 (frames 5..8)
    moved = vae.encode(changed).latent_dist.mode()
    differs = [not torch.equal(latents[:, :, j], moved[:, :, j]) for j in range(5)]
    assert differs == [False, False, True, False, False]
    # a 1-frame clip (how references are encoded) is the first latent frame of any clip starting with that frame
    assert torch.allclose(vae.encode(video[:, :, :1]).latent_dist.mode(), latents[:, :, :1], atol=1e-6)


def test_frame_count_must_be_4n_plus_1():
    with pytest.raises(ValueError, match="4n\\+1"):
        toy_vae().encode(torch.zeros(1, 3, 6, 16, 16))


@torch.no_grad()
def test_save_load_round_trip_and_bundle(tmp_path):
    vae = toy_vae(seed=3)
    save_vae(vae, tmp_path / "toy.safetensors")
    loaded = load_vae(tmp_path / "toy.safetensors")
    assert isinstance(loaded, ToyVideoVAE) and tuple(loaded.config.block_channels) == (8, 8, 16, 16)
    video = torch.rand(1, 3, 5, 32, 32) * 2 - 1
    latents = encode_video(vae, video)
    assert torch.equal(encode_video(loaded, video), latents)
    raw = vae.encode(video).latent_dist.mode()
    assert torch.allclose(latents, (raw - 0.1) / 2.0)  # normalised with the config's statistics
    assert torch.equal(decode_latents(loaded, latents), decode_latents(vae, latents))

    RefAlignPipeline(dit=tiny_dit(), vae=vae).save_bundle(tmp_path / "bundle")
    assert isinstance(RefAlignPipeline.from_bundle(tmp_path / "bundle").vae, ToyVideoVAE)
    with pytest.raises(RefAlignInputError, match="vae_tiling.*ToyVideoVAE"):
        RefAlignPipeline.from_files(tmp_path / "bundle" / "dit.safetensors", tmp_path / "toy.safetensors",
                                    vae_tiling=True)


def test_the_inference_path_imports_nothing_of_the_toy_world_or_training():
    import subprocess
    import sys

    code = ("import sys, refalign_core, refalign_core.inference.pipeline, refalign_core.models.vae, "
            "refalign_core.models.checkpoint, refalign_core.metrics.identity, refalign_core.metrics.eval, "
            "refalign_core.inference.bundles;"
            "print(sorted(m for m in sys.modules if m.startswith(('refalign_core.toy', 'refalign_core.training'))))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout + result.stderr
