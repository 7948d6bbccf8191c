"""Encoded references saved and read back (`reference_files`): the same latents and the same video as encoding again,
the VAE recognised by its probe across codecs and precisions, a file from another VAE or size refused, and files
written before the metadata still read (with a warning)."""

import copy
import hashlib
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from refalign_core.errors import RefAlignInputError
from refalign_core.inference.pipeline import RefAlignPipeline, VAECodec
from refalign_core.inference.reference_files import (FORMAT, PROBE_TOLERANCE, load_reference_latents, probe_difference,
                                                     probe_image, probe_latents, save_reference_latents)
from refalign_core.inference.references import prepare_references
from refalign_core.inference.sampler import SamplingSettings

from tiny_models import tiny_vae

WIDTH, HEIGHT = 48, 32
SETTINGS = SamplingSettings(width=WIDTH, height=HEIGHT, num_frames=5, steps=2, seed=4)


@pytest.fixture(scope="module")
def images():
    generator = torch.Generator().manual_seed(0)
    return [torch.rand(30, 40, 3, generator=generator), torch.rand(50, 20, 3, generator=generator)]


@pytest.fixture(scope="module")
def other_vae():
    return tiny_vae(seed=1)


def saved(path, vae, images, names=("red.png", "blue.png")):
    codec = VAECodec(vae)
    latents = codec.encode_references(prepare_references(images, WIDTH, HEIGHT))
    return save_reference_latents(path, latents, width=WIDTH, height=HEIGHT, vae_probe=codec, names=names)


def test_the_probe_image_is_fixed():
    """Every saved file holds this image's latents: changing it makes every file read as another VAE's."""
    probe = probe_image()
    assert probe.shape == (1, 3, 32, 32) and 0 <= probe.min() and probe.max() <= 1
    assert hashlib.sha256(probe.numpy().tobytes()).hexdigest()[:16] == "2f4ad6d4df326118"


def test_a_saved_file_gives_the_latents_and_the_video_of_encoding_again_bit_for_bit(dit, vae, images, tmp_path):
    path = saved(tmp_path / "refs.safetensors", vae, images)
    encoded = load_reference_latents(path, width=WIDTH, height=HEIGHT, vae_probe=VAECodec(vae))
    again = VAECodec(vae).encode_references(prepare_references(images, WIDTH, HEIGHT))
    assert encoded.latents.dtype == torch.float32 and torch.equal(encoded.latents, again)
    assert (encoded.width, encoded.height, encoded.names, encoded.count) == (WIDTH, HEIGHT, ("red.png", "blue.png"), 2)
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    assert metadata["format"] == FORMAT and metadata["count"] == "2" and json.loads(metadata["vae_probe"])["size"] == 32
    pipe = RefAlignPipeline(dit=dit, vae=vae, settings=SETTINGS)
    text = dict(prompt_embeds=torch.randn(1, 5, 32, generator=torch.Generator().manual_seed(1)),
                negative_prompt_embeds=torch.zeros(1, 5, 32))
    from_images = pipe(references=images, **text, decode=False)
    from_file = pipe(reference_latents=encoded.latents, **text, decode=False)
    assert torch.equal(from_file.latents, from_images.latents)


def test_the_vae_is_recognised_by_its_probe_across_precisions_and_another_is_refused(vae, other_vae, images,
                                                                                    tmp_path):
    path = saved(tmp_path / "refs.safetensors", vae, images)
    bf16 = probe_latents(VAECodec(copy.deepcopy(vae).to(torch.bfloat16)))
    fp32 = probe_latents(VAECodec(vae))
    assert probe_difference(fp32, bf16) < PROBE_TOLERANCE / 4  # measured 0.0056
    assert probe_difference(fp32, probe_latents(VAECodec(other_vae))) > 4 * PROBE_TOLERANCE  # measured 0.40
    load_reference_latents(path, vae_probe=bf16)  # the same VAE in bf16 (ComfyUI's default on a GPU)
    with pytest.raises(RefAlignInputError, match=r"refs.safetensors: the references were encoded with another VAE"):
        load_reference_latents(path, width=WIDTH, height=HEIGHT, vae_probe=VAECodec(other_vae))


def test_a_file_fitted_at_another_size_is_refused(vae, images, tmp_path):
    path = saved(tmp_path / "refs.safetensors", vae, images)
    with pytest.raises(RefAlignInputError, match="--reference-latents .*fitted at 48x32, but this run is 64x32"):
        load_reference_latents(path, width=64, height=32, what="--reference-latents")


def test_a_file_without_metadata_loads_with_a_warning_and_the_same_latents(vae, other_vae, images, tmp_path,
                                                                           caplog):
    latents = VAECodec(vae).encode_references(prepare_references(images, WIDTH, HEIGHT))
    save_file({"reference_latents": latents.contiguous()}, tmp_path / "old.safetensors")  # as encode-references was
    encoded = load_reference_latents(tmp_path / "old.safetensors", width=WIDTH, height=HEIGHT,
                                     vae_probe=VAECodec(other_vae))  # nothing to compare the VAE with
    assert torch.equal(encoded.latents, latents) and not encoded.checked and encoded.width is None
    assert "has no RefAlign metadata" in caplog.text and "cannot be checked" in caplog.text
    with pytest.raises(RefAlignInputError, match="are for 48x32, but this run is 64x64"):  # the grid still is
        load_reference_latents(tmp_path / "old.safetensors", width=64, height=64)
