import pytest
import torch
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
from safetensors.torch import save_file

from refalign_core.errors import RefAlignInputError
from refalign_core.models.text_encoder import encode_prompts, load_text_encoder
from refalign_core.models.vae import decode_latents, encode_video, load_vae, save_vae, vae_diffusers_to_original_key


def test_vae_original_naming_is_the_inverse_of_diffusers_converter(vae):
    original = {vae_diffusers_to_original_key(k): v for k, v in vae.state_dict().items()}
    assert {"conv1.weight", "conv2.weight", "encoder.conv1.weight", "decoder.head.2.weight",
            "encoder.middle.1.to_qkv.weight", "decoder.upsamples.3.resample.1.weight",
            "decoder.upsamples.4.shortcut.weight", "encoder.downsamples.0.residual.0.gamma"} <= set(original)
    back = convert_wan_vae_to_diffusers(original)
    assert back.keys() == vae.state_dict().keys()


@pytest.mark.parametrize("prefix", ["", "first_stage_model.", "vae."])
def test_vae_loads_from_original_and_comfy_files(vae, tmp_path, prefix):
    save_vae(vae, tmp_path / "v.safetensors")
    from safetensors.torch import load_file
    from safetensors import safe_open
    with safe_open(str(tmp_path / "v.safetensors"), "pt") as f:
        meta = f.metadata()
    tensors = {prefix + k: v for k, v in load_file(tmp_path / "v.safetensors").items()}
    save_file(tensors, tmp_path / "p.safetensors", metadata=meta)
    loaded = load_vae(tmp_path / "p.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(vae.state_dict().values(), loaded.state_dict().values()))
    assert loaded.config.base_dim == vae.config.base_dim


def test_vae_latents_are_normalised_and_decode_back(vae):
    video = torch.rand(1, 3, 5, 32, 48) * 2 - 1
    latents = encode_video(vae, video)
    assert latents.shape == (1, 16, 2, 4, 6)
    raw = vae.encode(video).latent_dist.mode()
    mean = torch.tensor(vae.config.latents_mean).view(1, 16, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, 16, 1, 1, 1)
    torch.testing.assert_close(latents * std + mean, raw)
    decoded = decode_latents(vae, latents)
    assert decoded.shape == video.shape and decoded.abs().max() <= 1


def test_vae_refuses_other_files(tmp_path):
    save_file({"blocks.0.weight": torch.zeros(2)}, tmp_path / "x.safetensors")
    with pytest.raises(RefAlignInputError, match="not a Wan VAE"):
        load_vae(tmp_path / "x.safetensors")


def test_text_encoder_pads_with_exact_zeros(text_encoder_dir):
    te = load_text_encoder(text_encoder_dir)
    embeds = encode_prompts(te, ["a red ball", "a much longer prompt about a striped box"])
    assert embeds.shape == (2, 512, te.dim)
    n_short = len(te.tokenizer("a red ball").input_ids)
    assert embeds[0, n_short:].abs().max() == 0
    assert embeds[0, :n_short].abs().min() > 0 or embeds[0, :n_short].abs().sum() > 0
    assert not torch.allclose(embeds[0, :n_short], embeds[1, :n_short])


def test_a_tokenizer_with_a_short_model_max_length_sets_the_padded_length(text_encoder_dir, tmp_path):
    import shutil

    from transformers import AutoTokenizer

    shutil.copytree(text_encoder_dir, tmp_path / "te")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "te")
    tokenizer.model_max_length = 24
    tokenizer.save_pretrained(tmp_path / "te")
    short, wan = load_text_encoder(tmp_path / "te"), load_text_encoder(text_encoder_dir)
    assert (short.length, wan.length) == (24, 512)  # an unset (huge) model_max_length keeps Wan's 512
    prompts = ["a red ball", "a much longer prompt"]
    embeds = encode_prompts(short, prompts)
    assert embeds.shape == (2, 24, short.dim)
    assert torch.equal(embeds, encode_prompts(wan, prompts)[:, :24])  # the same tokens, fewer zeros after them


def test_text_encoder_accepts_diffusers_pipeline_layout(text_encoder_dir, tmp_path):
    import shutil
    shutil.copytree(text_encoder_dir, tmp_path / "text_encoder")
    shutil.copytree(text_encoder_dir, tmp_path / "tokenizer")
    a = encode_prompts(load_text_encoder(tmp_path), ["same prompt"])
    b = encode_prompts(load_text_encoder(text_encoder_dir), ["same prompt"])
    assert torch.equal(a, b)


def test_text_encoder_refuses_a_folder_without_model(tmp_path):
    with pytest.raises(RefAlignInputError, match="text encoder"):
        load_text_encoder(tmp_path)
