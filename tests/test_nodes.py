"""Every node's FUNCTION on tiny models, with stand-ins for the ComfyUI runtime helpers."""

import os

import pytest
import torch

import comfy_stubs
from pack import load_pack
from refalign_core.bundles import EMBEDDED

EMBEDDED_MODEL = next(iter(EMBEDDED))

NODE_IDS = ["RefAlignLoader", "RefAlignMultiSubjectReference", "RefAlignR2VSampler", "RefAlignIdentityCheck",
            "RefAlignModelPatch", "RefAlignSubjectConditioning"]


@pytest.fixture
def comfy(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    state = comfy_stubs.install(tmp_path)
    pack = load_pack()
    yield pack, state, tmp_path
    comfy_stubs.uninstall()


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """The embedded toy model loaded once through the Loader node (no ComfyUI)."""
    with pytest.MonkeyPatch.context() as patch:  # the embedded bundle is built into this test's cache folder
        patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
        pack = load_pack()
        model, native = pack.NODE_CLASS_MAPPINGS["RefAlignLoader"]().load(EMBEDDED_MODEL, "default",
                                                                          "auto", "none")
        assert native is None  # no ComfyUI here: our reference DiT
        yield pack, model


def refs(pack, n=2, size=(40, 60)):
    images = [torch.rand(1, *size, 3) for _ in range(n)]
    node = pack.NODE_CLASS_MAPPINGS["RefAlignMultiSubjectReference"]()
    return node.collect(64, 64, **{f"image_{i + 1}": im for i, im in enumerate(images)})[0]


SMALL = dict(prompt="a red disc and a blue box", negative_prompt="", width=64, height=64, length=5, steps=2,
             shift=5.0, image_guidance=5.0, text_guidance=7.5, seed=3, sampler="euler",
             uncond_references="zeros_per_reference")


def test_registration_tooltips_descriptions_and_categories():
    pack = load_pack()
    assert list(pack.NODE_CLASS_MAPPINGS) == NODE_IDS
    assert set(pack.NODE_DISPLAY_NAME_MAPPINGS) == set(NODE_IDS)
    assert pack.WEB_DIRECTORY == "./web"
    for node_id, cls in pack.NODE_CLASS_MAPPINGS.items():
        assert cls.CATEGORY == "RefAlign" and len(cls.DESCRIPTION) > 40, node_id
        spec = cls.INPUT_TYPES()
        for section in spec.values():
            for name, (kind, options) in section.items():
                assert options.get("tooltip"), f"{node_id}.{name} has no tooltip"
        assert len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES)
        assert callable(getattr(cls(), cls.FUNCTION))
    assert pack.NODE_CLASS_MAPPINGS["RefAlignIdentityCheck"].OUTPUT_NODE


def test_loader_lists_and_loads_files_bundles_and_the_embedded_model(comfy):
    pack, state, root = comfy
    from refalign_core.checkpoint import save_dit
    from refalign_core.toy.tiny import tiny_dit
    loader = pack.NODE_CLASS_MAPPINGS["RefAlignLoader"]
    os.makedirs(root / "models" / "diffusion_models", exist_ok=True)
    save_dit(tiny_dit(), root / "models" / "diffusion_models" / "tiny_wan.safetensors")
    choices = loader.INPUT_TYPES()["required"]["model_name"][0]
    assert (root / "models" / "refalign").is_dir()  # models/refalign registered and created
    assert choices[0] == EMBEDDED_MODEL and "tiny_wan.safetensors" in choices
    model, native = loader().load("tiny_wan.safetensors", "fp8_e4m3fn", "auto", "comfy_managed")
    assert native is None  # the stubs have no ComfyUI model machinery: our DiT under ComfyUI's memory manager
    assert model.vae is None and model.patchers["dit"].model.diffusion_model is model.dit
    assert model.dit.blocks[0].attn1.to_q.weight.dtype == torch.float8_e4m3fn
    model.denoiser()
    assert state["loaded"] == [[model.patchers["dit"]]]
    embedded, _ = loader().load(EMBEDDED_MODEL, "default", "fp32", "comfy_managed")
    assert set(embedded.patchers) == {"dit", "vae", "text_encoder"}  # VAE and umT5 are not pinned to the device
    pack.refalign_core.pipeline.RefAlignPipeline(embedded.dit, embedded.vae, embedded.text_encoder).save_bundle(
        root / "models" / "refalign" / "my_bundle")
    assert "bundle: my_bundle" in loader.INPUT_TYPES()["required"]["model_name"][0]
    bundle, _ = loader().load("bundle: my_bundle", "default", "auto", "none")
    assert bundle.text_encoder is not None and bundle.vae is not None
    (root / "models" / "diffusion_models" / "not_wan.safetensors").write_bytes(
        (root / "models" / "diffusion_models" / "tiny_wan.safetensors").read_bytes()[:100])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        loader().load("not_wan.safetensors", "default", "auto", "none")


def test_multi_subject_reference_collects_batches_masks_and_refuses_bad_input():
    pack = load_pack()
    node = pack.NODE_CLASS_MAPPINGS["RefAlignMultiSubjectReference"]()
    mask = torch.zeros(1, 30, 50)
    mask[:, 5:25, 10:40] = 1
    references, preview = node.collect(64, 48, image_1=torch.rand(2, 30, 50, 3), mask_1=mask,
                                       image_3=torch.rand(1, 20, 20, 3))
    assert len(references.images) == 3 and references.masks[2] is None
    assert preview.shape == (3, 48, 64, 3)
    assert preview[2, 0, 0].tolist() == [1.0, 1.0, 1.0]  # square image in a wide frame: white padding, no crop
    with pytest.raises(ValueError, match="no references"):
        node.collect(64, 64)
    with pytest.raises(ValueError, match="at most 4"):
        node.collect(64, 64, image_1=torch.rand(3, 8, 8, 3), image_2=torch.rand(2, 8, 8, 3))
    with pytest.raises(ValueError, match="mask_2"):
        node.collect(64, 64, image_2=torch.rand(1, 8, 8, 3), mask_2=torch.ones(1, 9, 8))
    with pytest.raises(ValueError, match="multiples of 16"):
        node.collect(60, 64, image_1=torch.rand(1, 8, 8, 3))


def test_sampler_with_bundle_text_encoder_and_vae(toy):
    pack, model = toy
    sampler = pack.NODE_CLASS_MAPPINGS["RefAlignR2VSampler"]()
    frames, latent = sampler.sample(model, refs(pack), **SMALL)
    assert frames.shape == (5, 64, 64, 3) and 0 <= frames.min() and frames.max() <= 1
    assert latent["samples"].shape == (1, 16, 2, 8, 8)
    with torch.no_grad():  # the LATENT is in the bundle VAE's own (unnormalised) space
        decoded = model.vae.decode(latent["samples"]).sample.clamp(-1, 1)[0].permute(1, 2, 3, 0)
    torch.testing.assert_close((decoded + 1) / 2, frames, rtol=1e-4, atol=1e-4)
    again, _ = sampler.sample(model, refs(pack), **SMALL)
    assert again.shape == frames.shape


def test_sampler_reports_progress_and_stops_on_interrupt(comfy, toy):
    pack, state, _ = comfy
    _, model = toy
    sampler = pack.NODE_CLASS_MAPPINGS["RefAlignR2VSampler"]()
    sampler.sample(model, refs(pack), **SMALL)
    assert state["progress"] == [(1, 2), (2, 2)]
    kind, image, size = state["previews"][-1]  # a latent preview with every step
    assert len(state["previews"]) == 2 and kind == "JPEG" and image.size == (64, 64) and size == 512
    sampler.sample(model, refs(pack), **SMALL, previews=False)
    assert len(state["previews"]) == 2
    state["interrupt"] = True
    with pytest.raises(comfy_stubs.InterruptProcessingException):
        sampler.sample(model, refs(pack), **SMALL)


def test_sampler_speed_options_reach_the_core(toy, monkeypatch):
    pack, model = toy
    seen = []
    real = pack.nodes.sampler.generate
    monkeypatch.setattr(pack.nodes.sampler, "generate", lambda *a, **k: seen.append(a[3]) or real(*a, **k))
    sampler = pack.NODE_CLASS_MAPPINGS["RefAlignR2VSampler"]()
    references = refs(pack)
    plain, _ = sampler.sample(model, references, **SMALL)
    cached, _ = sampler.sample(model, references, **SMALL, text_kv_cache=True)
    sampler.sample(model, refs(pack), **{**SMALL, "steps": 4}, three_pass_steps=1, cache="first_block",
                   cache_threshold=0.3)
    sampler.sample(model, refs(pack), **{**SMALL, "steps": 4}, cache="taylorseer", cache_threshold=2)
    assert torch.equal(plain, cached)
    assert (seen[2].guidance_steps, seen[2].cache, seen[2].cache_threshold) == (1, "first_block", 0.3)
    assert (seen[3].cache, seen[3].cache_interval, seen[0].guidance_steps) == ("taylorseer", 2, None)


def test_loader_applies_a_lora_from_the_loras_folder_to_our_dit(comfy):
    from safetensors.torch import save_file
    from test_lora import comfy_lora
    pack, _, root = comfy
    loader = pack.NODE_CLASS_MAPPINGS["RefAlignLoader"]
    (root / "models" / "loras").mkdir(parents=True)
    save_file(comfy_lora(), root / "models" / "loras" / "mine.safetensors")
    from refalign_core.checkpoint import save_dit
    from refalign_core.toy.tiny import tiny_dit
    (root / "models" / "diffusion_models").mkdir(parents=True)
    save_dit(tiny_dit(0), root / "models" / "diffusion_models" / "tiny.safetensors")
    optional = loader.INPUT_TYPES()["optional"]
    assert "mine.safetensors" in optional["lora_1"][0] and "attention_backend" in optional
    base, _ = loader().load("tiny.safetensors", "default", "fp32", "none")
    with_lora, _ = loader().load("tiny.safetensors", "default", "fp32", "none", lora_1="mine.safetensors",
                                 lora_1_strength=0.8)
    delta = (with_lora.dit.blocks[0].attn1.to_q.base_layer.weight - base.dit.blocks[0].attn1.to_q.weight).abs()
    assert delta.max() > 1e-3


@pytest.mark.parametrize("bad,match", [(dict(length=8), "4n\\+1"), (dict(width=72), "multiples of 16")])
def test_sampler_refuses_bad_sizes(toy, bad, match):
    pack, model = toy
    with pytest.raises(ValueError, match=match):
        pack.NODE_CLASS_MAPPINGS["RefAlignR2VSampler"]().sample(model, refs(pack), **{**SMALL, **bad})


class NativeVAE:
    """Stands in for ComfyUI's VAE object: encode/decode in VAE space, [B,H,W,C] / [B,T,H,W,C] pixels."""

    def __init__(self, vae, latent_channels=16):
        self.vae, self.latent_channels = vae, latent_channels
        self.encoded = 0

    def encode(self, pixels):
        self.encoded += 1
        video = pixels.movedim(-1, 0)[None] * 2 - 1  # [1, 3, T, H, W]
        return self.vae.encode(video).latent_dist.mode()

    def decode(self, latents):
        return ((self.vae.decode(latents).sample + 1) / 2).clamp(0, 1).movedim(1, -1)  # [1, T, H, W, 3]


def test_sampler_with_native_conditioning_and_vae_matches_the_bundle_path(comfy):
    pack, _, root = comfy
    from refalign_core.toy.demo import build_random_bundle
    loader = pack.NODE_CLASS_MAPPINGS["RefAlignLoader"]
    loader.INPUT_TYPES()  # registers models/refalign
    build_random_bundle(root / "models" / "refalign" / "wan_vae_bundle")  # a Wan2.1 VAE, like ComfyUI's native one
    model, _ = loader().load("bundle: wan_vae_bundle", "default", "fp32", "none")
    sampler = pack.NODE_CLASS_MAPPINGS["RefAlignR2VSampler"]()
    positive = [[model.encode_prompts([SMALL["prompt"]]), {"pooled_output": None}]]
    negative = [[model.encode_prompts([""]), {}]]
    references = refs(pack)
    vae = NativeVAE(model.vae)
    native, latent = sampler.sample(model, references, **SMALL, positive=positive, negative=negative, vae=vae,
                                    previews=False)
    bundled, latent_b = sampler.sample(model, references, **SMALL)
    assert vae.encoded == 2  # one 1-frame encode per reference
    torch.testing.assert_close(latent["samples"], latent_b["samples"], rtol=1e-4, atol=1e-4)
    assert (native - bundled).abs().max() < 0.02
    with pytest.raises(ValueError, match="latent channels"):
        sampler.sample(model, references, **SMALL, vae=NativeVAE(model.vae, latent_channels=48))
    with pytest.raises(ValueError, match="umT5"):
        sampler.sample(model, references, **SMALL, positive=[[torch.zeros(1, 7, 4096), {}]])


def test_identity_check_node_outputs_scores_text_and_sheet(comfy, toy):
    pack, state, root = comfy
    _, model = toy
    references = refs(pack)
    frames, _ = pack.NODE_CLASS_MAPPINGS["RefAlignR2VSampler"]().sample(model, references, **SMALL)
    out = pack.NODE_CLASS_MAPPINGS["RefAlignIdentityCheck"]().check(frames, False, 8, references=references)
    overall, s1, s2, s3, s4, text, sheet = out["result"]
    assert -1 <= overall <= 1 and s3 == s4 == 0.0 and overall == pytest.approx((s1 + s2) / 2)
    assert "subject 1" in text and out["ui"]["text"] == [text]
    assert sheet.ndim == 4 and sheet.shape[-1] == 3
    assert (root / "temp" / out["ui"]["images"][0]["filename"]).is_file()
    with pytest.raises(ValueError, match="no references"):
        pack.NODE_CLASS_MAPPINGS["RefAlignIdentityCheck"]().check(frames, False, 8)


class FakeClipVision:
    """ComfyUI CLIP_VISION stand-in: a square 7x7 patch grid + class token from a fixed random projection."""

    def __init__(self):
        torch.manual_seed(0)
        self.proj = torch.nn.Conv2d(3, 24, 32, 32)

    def encode_image(self, image, crop=True):
        x = torch.nn.functional.interpolate(image.movedim(-1, 1), size=(224, 224), mode="bilinear")
        tokens = self.proj(x).flatten(2).transpose(1, 2)  # [B, 49, 24]
        return {"last_hidden_state": torch.cat([tokens.mean(1, keepdim=True), tokens], 1)}


def test_identity_check_with_a_clip_vision_backbone(toy):
    pack, _ = toy
    frames = torch.rand(9, 64, 96, 3)
    out = pack.NODE_CLASS_MAPPINGS["RefAlignIdentityCheck"]().check(
        frames, False, 4, reference_images=torch.rand(2, 40, 40, 3), clip_vision=FakeClipVision())
    assert "backbone clip_vision" in out["result"][5]
    tokens = pack.nodes.identity.ClipVisionTokens(FakeClipVision())(torch.rand(1, 3, 64, 96))
    assert tokens.shape == (1, 4 * 6, 24)
