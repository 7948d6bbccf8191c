"""RefAlign Save / Load Encoded References on stand-ins for ComfyUI's runtime: files under ComfyUI's
models/refalign_references (never the pack's folder), the latents and the sampled video bit for bit those of encoding
the images, files exchanged with the core's codec (the CLI's), and another VAE or size refused."""

import sys
import types

import pytest
import torch

import comfy_stubs
from pack import ROOT, load_pack, pack_nodes, run_node
from refalign_core.errors import RefAlignInputError
from refalign_core.inference.pipeline import DiTDenoiser, VAECodec
from refalign_core.inference.reference_files import load_reference_latents, save_reference_latents
from refalign_core.models.vae import wan21_latent_stats

from tiny_models import tiny_vae

WIDTH, HEIGHT = 64, 48
FOLDER = "refalign_references"


@pytest.fixture
def comfy(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    comfy_stubs.install(tmp_path)
    pack = load_pack()
    nodes = pack_nodes(pack)
    yield pack, nodes, tmp_path
    comfy_stubs.uninstall()


@pytest.fixture(scope="module")
def vaes():
    return tiny_vae(seed=0), tiny_vae(seed=1)


def subjects(nodes):
    generator = torch.Generator().manual_seed(0)
    images = {"image_1": torch.rand(1, 30, 40, 3, generator=generator),
              "image_2": torch.rand(1, 50, 20, 3, generator=generator)}
    return run_node(nodes["RefAlignMultiSubjectReference"], width=WIDTH, height=HEIGHT, **images)[0]


def save(nodes, vae, references, prefix="refs"):
    out = nodes["RefAlignSaveEncodedReferences"].execute(vae=vae, references=references, width=WIDTH, height=HEIGHT,
                                                         filename_prefix=prefix)
    return out.result[0], out.ui["text"][0]


def load(nodes, name, vae, width=WIDTH, height=HEIGHT):
    return run_node(nodes["RefAlignLoadEncodedReferences"], encoded_references=name, vae=vae, width=width,
                    height=height)[0]


def test_save_writes_numbered_files_under_comfyuis_models_folder_and_load_gives_the_same_latents(comfy, vaes):
    pack, nodes, root = comfy
    vae = pack.nodes.bundle_models.BundleVAE(vaes[0])
    references = subjects(nodes)
    saved, shown = save(nodes, vae, references)
    assert shown == f"models/{FOLDER}/refs_00001_.safetensors"
    assert (root / "models" / FOLDER / "refs_00001_.safetensors").is_file()
    assert save(nodes, vae, references, "sub/refs")[1] == f"models/{FOLDER}/sub/refs_00001_.safetensors"
    assert save(nodes, vae, references)[1] == f"models/{FOLDER}/refs_00002_.safetensors"
    assert not list(ROOT.rglob("refs_0000*"))  # nothing in the pack's folder
    schema = {i.id: i for i in pack_nodes(pack)["RefAlignLoadEncodedReferences"].GET_SCHEMA().inputs}
    assert schema["encoded_references"].options == ["refs_00001_.safetensors", "refs_00002_.safetensors",
                                                    "sub/refs_00001_.safetensors"]
    expected = pack.nodes.native.ComfyVAECodec(vae).encode_references(references.fitted(WIDTH, HEIGHT))
    loaded = load(nodes, "refs_00001_.safetensors", vae)
    assert loaded.references == [] and loaded.count == 2 and loaded.encoded.names == ("subject 1", "subject 2")
    assert torch.equal(loaded.latents(WIDTH, HEIGHT), expected)
    assert torch.equal(saved.latents(WIDTH, HEIGHT), expected) and saved.references == references.references
    with pytest.raises(RefAlignInputError, match="encoded with another VAE"):
        load(nodes, "refs_00001_.safetensors", pack.nodes.bundle_models.BundleVAE(vaes[1]))
    with pytest.raises(RefAlignInputError, match="fitted at 64x48, but this run is 64x64"):
        load(nodes, "refs_00001_.safetensors", vae, height=64)


def test_files_cross_between_the_core_codec_and_comfyuis_vae(comfy, vaes):
    """The probe recognises the same weights behind the core's `VAECodec` (what the CLI writes with) and a ComfyUI
    VAE (`ComfyVAECodec`), both ways."""
    pack, nodes, root = comfy
    vae = pack.nodes.bundle_models.BundleVAE(vaes[0])
    references = subjects(nodes)
    core = VAECodec(vaes[0])
    (root / "models" / FOLDER).mkdir(parents=True)
    save_reference_latents(root / "models" / FOLDER / "cli.safetensors",
                           core.encode_references(references.fitted(WIDTH, HEIGHT)), width=WIDTH, height=HEIGHT,
                           vae_probe=core)
    assert load(nodes, "cli.safetensors", vae).count == 2
    save(nodes, vae, references)
    load_reference_latents(root / "models" / FOLDER / "refs_00001_.safetensors", width=WIDTH, height=HEIGHT,
                           vae_probe=core)
    with pytest.raises(RefAlignInputError, match="another VAE"):
        load_reference_latents(root / "models" / FOLDER / "refs_00001_.safetensors", vae_probe=VAECodec(vaes[1]))


def patched_model(text_dim=32, in_dim=16):
    """What the sampler's input checks read of a ModelPatcher with the RefAlign patch."""
    diffusion_model = types.SimpleNamespace(text_dim=text_dim, in_dim=in_dim)
    return types.SimpleNamespace(model=types.SimpleNamespace(diffusion_model=diffusion_model),
                                 get_model_object=lambda name: None,
                                 get_wrappers=lambda kind, key: [object()] if key == "refalign" else [])


def test_the_r2v_sampler_samples_loaded_references_bit_for_bit_as_the_images(comfy, vaes, dit, monkeypatch):
    """The native denoiser stood in by our DiT on the same conditioning: what reaches it from a loaded file is what
    the images give, so the video is the same bit for bit; a file fitted at another size is refused."""
    pack, nodes, _ = comfy

    class CoreDenoiser:
        def __init__(self, model, previews=True):
            pass

        def __call__(self, text, reference_latents, settings, **kwargs):
            positive, negative = (conditioning[0][0] for conditioning in text)
            return DiTDenoiser(dit)((positive, negative), reference_latents, settings, **kwargs)

    monkeypatch.setattr(pack.nodes.sampler, "NativeDenoiser", CoreDenoiser)
    vae = pack.nodes.bundle_models.BundleVAE(vaes[0])
    references = subjects(nodes)
    save(nodes, vae, references)
    generator = torch.Generator().manual_seed(2)
    inputs = dict(model=patched_model(), positive=[[torch.randn(1, 5, 32, generator=generator), {}]],
                  negative=[[torch.zeros(1, 5, 32), {}]], vae=vae, width=WIDTH, height=HEIGHT, num_frames=5,
                  steps=2, shift=5.0, image_scale=5.0, text_scale=7.5, seed=3, sampler="euler",
                  uncond_references="zeros_per_reference")
    sampler = nodes["RefAlignR2VSampler"]
    frames, latent = run_node(sampler, references=references, **inputs)
    loaded = load(nodes, "refs_00001_.safetensors", vae)
    frames_file, latent_file = run_node(sampler, references=loaded, **inputs)
    assert torch.equal(latent_file["samples"], latent["samples"]) and torch.equal(frames_file, frames)
    with pytest.raises(RefAlignInputError, match="references refs_00001_.safetensors: the references were fitted at "
                                                 "64x48, but this run is 64x64"):
        run_node(sampler, references=loaded, **{**inputs, "height": 64})


def test_subject_conditioning_uses_loaded_references_in_the_vaes_space(comfy, vaes, monkeypatch):
    pack, nodes, _ = comfy
    helpers = types.ModuleType("node_helpers")
    helpers.conditioning_set_values = lambda cond, values: [[c[0], {**c[1], **values}] for c in cond]
    formats = types.ModuleType("comfy.latent_formats")
    mean, std = wan21_latent_stats()
    formats.Wan21 = type("Wan21", (), {"process_out": lambda self, latent: latent * std + mean})
    monkeypatch.setitem(sys.modules, "node_helpers", helpers)
    monkeypatch.setitem(sys.modules, "comfy.latent_formats", formats)
    monkeypatch.setattr(sys.modules["comfy"], "latent_formats", formats, raising=False)
    vae = pack.nodes.bundle_models.BundleVAE(vaes[0])
    references = subjects(nodes)
    save(nodes, vae, references)
    loaded = load(nodes, "refs_00001_.safetensors", vae)
    node = nodes["RefAlignSubjectConditioning"]
    text = [[torch.zeros(1, 5, 32), {}]]
    inputs = dict(positive=text, negative=text, vae=vae, width=WIDTH, height=HEIGHT, num_frames=5, batch_size=1,
                  uncond_references="zeros_per_reference")
    from_images = run_node(node, references=references, **inputs)
    from_file = run_node(node, references=loaded, **inputs)
    for a, b in zip(from_images[:3], from_file[:3]):  # DiT space and back: equal up to float rounding
        torch.testing.assert_close(b[0][1]["time_dim_concat"], a[0][1]["time_dim_concat"], rtol=0, atol=1e-5)
    assert torch.equal(from_file[3]["samples"], from_images[3]["samples"])
    with pytest.raises(RefAlignInputError, match="fitted at 64x48, but this run is 96x48"):
        run_node(node, references=loaded, **{**inputs, "width": 96})
