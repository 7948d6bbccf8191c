"""The nodes' own logic with stand-ins for ComfyUI's runtime (CI has no ComfyUI): registration, the Loader's choices
and routing, the bundle VAE / CLIP against the core path, the input checks of the sampler and the guider, the
example images and the Identity Check. Sampling on ComfyUI's MODEL is checked against the core path in a real
ComfyUI by `tools/comfyui_parity.py`."""

import inspect
import json
import types

import pytest
import torch

import comfy_stubs
from pack import load_pack, pack_nodes, run_node
from refalign_core.inference.bundles import embedded_bundles, read_bundle
from refalign_core.errors import RefAlignInputError
from refalign_core.inference.pipeline import VAECodec
from refalign_core.models.text_encoder import encode_prompts, load_text_encoder
from refalign_core.toy import EMBEDDED
from refalign_core.models.vae import load_vae, wan21_latent_stats

EMBEDDED_MODEL = next(iter(EMBEDDED))
NODE_IDS = ["RefAlignLoader", "RefAlignMultiSubjectReference", "RefAlignR2VSampler", "RefAlignIdentityCheck",
            "RefAlignModelPatch", "RefAlignSubjectConditioning", "RefAlignGuider", "RefAlignExampleImage",
            "RefAlignSaveEncodedReferences", "RefAlignLoadEncodedReferences", "RefAlignSegmentLatent",
            "RefAlignJoinSegments"]
PATCH_KEY = "refalign"


@pytest.fixture
def comfy(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    state = comfy_stubs.install(tmp_path)
    pack = load_pack()
    pack_nodes(pack)
    yield pack, state, tmp_path
    comfy_stubs.uninstall()


def refs(pack, n=2, size=(40, 60)):
    images = [torch.rand(1, *size, 3) for _ in range(n)]
    node = pack_nodes(pack)["RefAlignMultiSubjectReference"]
    return run_node(node, width=64, height=64, **{f"image_{i + 1}": im for i, im in enumerate(images)})[0]


def test_one_registration_form_v3_schemas_tooltips_descriptions_and_only_comfyui_model_types():
    pack = load_pack()
    assert not hasattr(pack, "NODE_CLASS_MAPPINGS") and not hasattr(pack, "WEB_DIRECTORY")  # comfy_entrypoint only
    nodes = pack_nodes(pack)
    assert list(nodes) == NODE_IDS
    for node_id, cls in nodes.items():
        schema = cls.GET_SCHEMA()
        assert schema.category == "RefAlign" and len(schema.description) > 40 and schema.display_name, node_id
        assert schema.display_name.startswith("RefAlign "), node_id
        for entry in schema.inputs + schema.outputs:
            assert entry.tooltip, f"{node_id}: {getattr(entry, 'id', None) or entry.display_name} has no tooltip"
        assert not any("REFALIGN_MODEL" in e.io_type for e in schema.inputs + schema.outputs), node_id
        assert set(inspect.signature(cls.execute).parameters) >= {i.id for i in schema.inputs if not i.optional}


def test_loader_lists_files_bundles_and_the_embedded_model_under_core_input_names(comfy):
    pack, _, root = comfy
    loader = pack_nodes(pack)["RefAlignLoader"]
    (root / "models" / "diffusion_models").mkdir(parents=True)
    (root / "models" / "diffusion_models" / "RefAlign-1.3B.safetensors").write_bytes(b"")
    (root / "models" / "diffusion_models" / "notes.txt").write_text("")
    spec = {entry.id: entry for entry in loader.GET_SCHEMA().inputs}
    assert list(spec) == ["unet_name", "weight_dtype"]
    choices = spec["unet_name"].options
    assert choices[0] == EMBEDDED_MODEL and "RefAlign-1.3B.safetensors" in choices and "notes.txt" not in choices
    assert spec["weight_dtype"].options == ["default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2"]
    assert not (root / "models" / "refalign").exists()  # nothing is written into ComfyUI's folders
    options = pack.nodes.loader.model_options
    assert options("default") == {} and options("fp8_e5m2") == {"dtype": torch.float8_e5m2}
    assert options("fp8_e4m3fn_fast") == {"dtype": torch.float8_e4m3fn, "fp8_optimizations": True}


def test_loader_loads_the_dit_through_comfyui_and_a_bundles_text_encoder_and_vae_as_clip_and_vae(comfy,
                                                                                                 monkeypatch):
    pack, _, root = comfy
    loaded = []
    monkeypatch.setattr(pack.nodes.loader, "load_native_dit", lambda path, options: loaded.append((path, options))
                        or "MODEL")
    loader = pack_nodes(pack)["RefAlignLoader"]
    model, clip, vae = run_node(loader, unet_name=EMBEDDED_MODEL, weight_dtype="fp8_e4m3fn")
    bundle = read_bundle(embedded_bundles()[EMBEDDED_MODEL])
    assert model == "MODEL" and loaded == [(bundle.dit, {"dtype": torch.float8_e4m3fn})]
    assert type(clip).__name__ == "BundleCLIP" and type(vae).__name__ == "BundleVAE"
    assert vae.latent_channels == 16
    (root / "models" / "diffusion_models").mkdir(parents=True)
    (root / "models" / "diffusion_models" / "dit.safetensors").write_bytes(b"")
    assert run_node(loader, unet_name="dit.safetensors", weight_dtype="default") == ("MODEL", None, None)
    assert loaded[-1] == (str(root / "models" / "diffusion_models" / "dit.safetensors"), {})


@pytest.fixture(scope="module")
def toy_parts():
    bundle = read_bundle(embedded_bundles()[EMBEDDED_MODEL])
    return load_vae(bundle.vae), load_text_encoder(bundle.text_encoder)


def test_bundle_vae_speaks_the_wan21_latent_convention_and_matches_the_core_codec(comfy, toy_parts):
    pack, state, _ = comfy
    vae = pack.nodes.bundle_models.BundleVAE(toy_parts[0])
    core = VAECodec(toy_parts[0])
    mean, std = wan21_latent_stats()
    image = torch.rand(1, 64, 48, 3)
    latent = vae.encode(image)  # one frame, as the sampler encodes each reference
    assert latent.shape == (1, 16, 1, 8, 6) and state["loaded"]  # loaded through the memory manager
    torch.testing.assert_close((latent - mean) / std, core.encode_references(image.permute(0, 3, 1, 2)),
                               rtol=1e-5, atol=1e-5)
    video = torch.rand(5, 64, 48, 3)
    latents = vae.encode(video)
    assert latents.shape == (1, 16, 2, 8, 6)
    frames = vae.decode(latents)
    assert frames.shape == (1, 5, 64, 48, 3) and 0 <= frames.min() and frames.max() <= 1
    torch.testing.assert_close(frames[0], core.decode((latents - mean) / std), rtol=1e-5, atol=1e-5)
    assert vae.spacial_compression_decode() == 8 and vae.temporal_compression_decode() == 4
    assert vae.downscale_ratio[0](81) == 21 and vae.upscale_ratio[0](21) == 81
    with pytest.raises(RefAlignInputError, match="4n\\+1"):
        vae.encode(torch.rand(4, 64, 48, 3))
    with pytest.raises(RefAlignInputError, match="multiples of 8"):
        vae.encode(torch.rand(1, 60, 48, 3))


def test_bundle_clip_gives_the_core_paths_embeddings_through_clip_text_encodes_calls(comfy, toy_parts):
    pack, _, _ = comfy
    clip = pack.nodes.bundle_models.BundleCLIP(toy_parts[1])
    prompt = "a disc moves right and a square moves left"
    conditioning = clip.encode_from_tokens_scheduled(clip.tokenize(prompt))  # what CLIPTextEncode does
    assert len(conditioning) == 1 and conditioning[0][1] == {}
    torch.testing.assert_close(conditioning[0][0], encode_prompts(toy_parts[1], [prompt]))


def fake_model(patched=True, text_dim=64, in_dim=16):
    """What the input checks read of a ModelPatcher: its RefAlign wrapper and the Wan model's widths."""
    diffusion_model = types.SimpleNamespace(text_dim=text_dim, in_dim=in_dim)
    return types.SimpleNamespace(
        model=types.SimpleNamespace(diffusion_model=diffusion_model), get_model_object=lambda name: None,
        get_wrappers=lambda kind, key: [object()] if patched and key == PATCH_KEY else [])


SMALL = dict(width=64, height=64, num_frames=5, steps=2, shift=5.0, image_scale=5.0, text_scale=7.5, seed=3,
             sampler="euler", uncond_references="zeros_per_reference")


@pytest.mark.parametrize("change,match", [
    (dict(model=fake_model(patched=False)), "no RefAlign patch"),
    (dict(model="not a model"), "no RefAlign patch"),
    (dict(positive=[[torch.zeros(1, 7, 4096), {}]]), "positive: text embeddings \\[1, L, 64\\]"),
    (dict(negative=[]), "negative: .* got nothing"),
    (dict(vae=None), "vae: no VAE"),
    (dict(vae=types.SimpleNamespace(latent_channels=48)), "48 latent channels"),
    (dict(num_frames=8), "4n\\+1"),
    (dict(width=72), "multiples of 16"),
])
def test_sampler_refuses_bad_input_before_any_work(comfy, change, match):
    pack, _, _ = comfy
    text = [[torch.zeros(1, 7, 64), {}]]
    inputs = dict(model=fake_model(), positive=text, negative=text, vae=types.SimpleNamespace(latent_channels=16),
                  references=refs(pack), **SMALL)
    with pytest.raises(RefAlignInputError, match=match):
        run_node(pack_nodes(pack)["RefAlignR2VSampler"], **{**inputs, **change})


def test_guider_refuses_an_unpatched_model_and_text_of_the_wrong_width(comfy):
    pack, _, _ = comfy
    guider = pack_nodes(pack)["RefAlignGuider"]
    text = [[torch.zeros(1, 7, 64), {}]]
    with pytest.raises(RefAlignInputError, match="no RefAlign patch"):
        guider.execute(fake_model(patched=False), text, text, text, 5.0, 7.5)
    with pytest.raises(RefAlignInputError, match="negative_img_text"):
        guider.execute(fake_model(), text, text, [[torch.zeros(1, 7, 32), {}]], 5.0, 7.5)


def test_example_image_node_reads_the_packs_examples_in_place():
    node = pack_nodes(load_pack())["RefAlignExampleImage"]
    names = node.GET_SCHEMA().inputs[0].options
    assert names == ["refalign_example_red_disc.png", "refalign_example_striped_square.png"]
    image = run_node(node, image=names[0])[0]
    assert image.shape[0] == 1 and image.shape[-1] == 3 and image.dtype == torch.float32 and image.max() <= 1
    with pytest.raises(RefAlignInputError, match="example images"):
        run_node(node, image="../pyproject.toml")


def test_multi_subject_reference_collects_batches_masks_and_refuses_bad_input():
    node = pack_nodes(load_pack())["RefAlignMultiSubjectReference"]
    refs_, preview = node.execute(64, 48, image_1=torch.rand(2, 30, 40, 3), image_2=torch.rand(1, 50, 20, 3),
                                  mask_2=torch.ones(50, 20)).result
    assert len(refs_.references) == 3 and preview.shape == (3, 48, 64, 3)
    assert refs_.masks[2] is not None and [r.name for r in refs_.references] == ["subject 1", "subject 2",
                                                                                  "subject 3"]
    with pytest.raises(RefAlignInputError, match="mask_2 is connected but image_2 is not"):
        node.execute(64, 48, image_1=torch.rand(1, 8, 8, 3), mask_2=torch.ones(8, 8))
    with pytest.raises(RefAlignInputError, match="mask_1 has shape"):
        node.execute(64, 48, image_1=torch.rand(1, 8, 8, 3), mask_1=torch.ones(1, 9, 8))
    with pytest.raises(RefAlignInputError, match="at most 4"):
        node.execute(64, 48, image_1=torch.rand(5, 8, 8, 3))


def test_identity_check_node_outputs_scores_text_and_sheet(comfy):
    pack, state, root = comfy
    references = refs(pack)
    frames = torch.rand(5, 64, 64, 3)
    node = pack_nodes(pack)["RefAlignIdentityCheck"]
    out = node.execute(frames, False, 8, references=references)
    overall, s1, s2, s3, s4, text, sheet = out.result
    assert -1 <= overall <= 1 and s3 == s4 == 0.0 and overall == pytest.approx((s1 + s2) / 2)
    assert "subject 1" in text and out.ui["text"] == [text]
    assert sheet.ndim == 4 and sheet.shape[-1] == 3
    assert (root / "temp" / out.ui["images"][0]["filename"]).is_file()
    with pytest.raises(RefAlignInputError, match="no references"):
        node.execute(frames, False, 8)


class FakeClipVision:
    """ComfyUI CLIP_VISION stand-in: a square 7x7 patch grid + class token from a fixed random projection."""

    def __init__(self):
        torch.manual_seed(0)
        self.proj = torch.nn.Conv2d(3, 24, 32, 32)

    def encode_image(self, image, crop=True):
        x = torch.nn.functional.interpolate(image.movedim(-1, 1), size=(224, 224), mode="bilinear")
        tokens = self.proj(x).flatten(2).transpose(1, 2)  # [B, 49, 24]
        return {"last_hidden_state": torch.cat([tokens.mean(1, keepdim=True), tokens], 1)}


def test_identity_check_with_a_clip_vision_backbone():
    pack = load_pack()
    frames = torch.rand(9, 64, 96, 3)
    out = run_node(pack_nodes(pack)["RefAlignIdentityCheck"], frames=frames, faces=False, sample_frames=4,
                   reference_images=torch.rand(2, 40, 40, 3), clip_vision=FakeClipVision())
    assert "backbone clip_vision" in out[5]
    tokens = pack.nodes.identity.ClipVisionTokens(FakeClipVision())(torch.rand(1, 3, 64, 96))
    assert tokens.shape == (1, 4 * 6, 24)


def test_the_pack_imports_without_writing_anything(tmp_path, monkeypatch):
    comfy_stubs.install(tmp_path)
    try:
        pack_nodes(load_pack())  # as ComfyUI registers them: every schema defined
    finally:
        comfy_stubs.uninstall()
    assert not any(tmp_path.rglob("*")), json.dumps([str(p) for p in tmp_path.rglob("*")])


def test_sampler_widgets_offer_only_what_the_core_accepts(comfy):
    """The widgets take their defaults and limits from the core's SamplingSettings: their defaults, minimums and
    maximums are all accepted by it, and one step beyond a limit the core defines is refused."""
    from refalign_core.errors import RefAlignInputError
    from refalign_core.inference.sampler import SamplingSettings
    pack, _, _ = comfy
    fields = {"width": "width", "height": "height", "num_frames": "num_frames", "steps": "steps", "shift": "shift",
              "image_scale": "image_scale", "text_scale": "text_scale", "seed": "seed", "sampler": "sampler",
              "uncond_references": "uncond_references"}
    inputs = {i.id: i for i in pack_nodes(pack)["RefAlignR2VSampler"].GET_SCHEMA().inputs if i.id in fields}
    assert set(inputs) == set(fields)
    defaults = SamplingSettings()
    for name, entry in inputs.items():
        assert entry.settings["default"] == getattr(defaults, fields[name]), name
        for limit in ("min", "max"):
            if limit in entry.settings:
                SamplingSettings(**{fields[name]: entry.settings[limit]})
    for name, beyond in (("steps", 1), ("shift", 1.0), ("seed", 1)):
        with pytest.raises(RefAlignInputError):
            SamplingSettings(**{fields[name]: inputs[name].settings["max"] + beyond})
