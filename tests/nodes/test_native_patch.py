"""The RefAlign Model Patch's mechanism on a stand-in for ComfyUI's ModelPatcher and Wan model (CI has no ComfyUI;
`tools/comfyui_parity.py` checks the same against the real one)."""

import sys
import types

import pytest
import torch
import torch.nn.functional as F

from pack import load_pack, pack_nodes

DIFFUSION_MODEL = "diffusion_model"


class Executor:
    """Calls the wrappers in order, then the wrapped function (as ComfyUI's WrapperExecutor does)."""

    def __init__(self, function, class_obj, wrappers, index=0):
        self.function, self.class_obj, self.wrappers, self.index = function, class_obj, wrappers, index

    def __call__(self, *args, **kwargs):
        if self.index == len(self.wrappers):
            return self.function(*args, **kwargs)
        following = Executor(self.function, self.class_obj, self.wrappers, self.index + 1)
        return self.wrappers[self.index](following, *args, **kwargs)


class CrossAttention(torch.nn.Module):
    def __init__(self, dim, text_dim):
        super().__init__()
        self.q, self.k, self.v = torch.nn.Linear(dim, dim), torch.nn.Linear(text_dim, dim), torch.nn.Linear(text_dim, dim)

    def forward(self, x, context, transformer_options={}, **kwargs):
        return F.scaled_dot_product_attention(self.q(x), self.k(context), self.v(context))


class Block(torch.nn.Module):
    def __init__(self, dim, text_dim):
        super().__init__()
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.cross_attn = CrossAttention(dim, text_dim)

    def forward(self, x, context, transformer_options, video_tokens=None):
        x = x + F.scaled_dot_product_attention(*self.qkv(x).chunk(3, dim=-1))  # mixes video and reference tokens
        update = self.cross_attn(x, context, transformer_options=transformer_options)
        if video_tokens is not None:  # the oracle: RefAlign's reference tokens skip text cross-attention
            update = torch.cat([update[:, :video_tokens], torch.zeros_like(update[:, video_tokens:])], dim=1)
        return x + update


class WanModel(torch.nn.Module):
    """Wan-like: reference frames appended on the time axis, tokens patchified with padding, output cropped."""

    patch_size = (1, 2, 2)
    model_type = "t2v"
    ref_conv = None

    def __init__(self, dim=16, text_dim=8, blocks=2):
        super().__init__()
        torch.manual_seed(0)
        self.patch_embedding = torch.nn.Conv3d(4, dim, self.patch_size, self.patch_size)
        self.blocks = torch.nn.ModuleList(Block(dim, text_dim) for _ in range(blocks))
        self.head = torch.nn.Linear(dim, 4)

    def forward(self, x, timestep, context, clip_fea=None, time_dim_concat=None, transformer_options={}):
        wrappers = [w for ws in transformer_options.get("wrappers", {}).get(DIFFUSION_MODEL, {}).values() for w in ws]
        return Executor(self._forward, self, wrappers)(x, timestep, context, clip_fea, time_dim_concat,
                                                       transformer_options)

    def _forward(self, x, timestep, context, clip_fea=None, time_dim_concat=None, transformer_options={},
                 oracle=False):
        pad = lambda t: F.pad(t, (0, -t.shape[4] % 2, 0, -t.shape[3] % 2))  # noqa: E731
        x = pad(x)
        video_tokens = x.shape[2] * (x.shape[3] // 2) * (x.shape[4] // 2)
        if time_dim_concat is not None:
            x = torch.cat([x, pad(time_dim_concat)], dim=2)
        tokens = self.patch_embedding(x).flatten(2).transpose(1, 2)
        for block in self.blocks:
            tokens = block(tokens, context, transformer_options, video_tokens if oracle else None)
        return self.head(tokens[:, :video_tokens])


class WAN21:
    def __init__(self, diffusion_model):
        self.diffusion_model = diffusion_model


def _get_attr(obj, path):
    for name in path.split("."):
        obj = obj[int(name)] if name.isdigit() else getattr(obj, name)
    return obj


class ModelPatcher:
    """Object patches and wrappers as ComfyUI's ModelPatcher keeps them (clones share the model)."""

    def __init__(self, model):
        self.model, self.object_patches, self.wrappers = model, {}, {}

    def clone(self):
        other = ModelPatcher(self.model)
        other.object_patches = dict(self.object_patches)
        other.wrappers = {kind: {k: list(v) for k, v in by_key.items()} for kind, by_key in self.wrappers.items()}
        return other

    def get_model_object(self, name):
        return self.object_patches[name] if name in self.object_patches else _get_attr(self.model, name)

    def add_object_patch(self, name, obj):
        self.object_patches[name] = obj

    def add_wrapper_with_key(self, kind, key, wrapper):
        self.wrappers.setdefault(kind, {}).setdefault(key, []).append(wrapper)

    def remove_wrappers_with_key(self, kind, key):
        self.wrappers.get(kind, {}).pop(key, None)

    def get_wrappers(self, kind, key):
        return self.wrappers.get(kind, {}).get(key, [])

    def __call__(self, x, t, context, references=None):
        """The diffusion model with this patcher's object patches applied, then removed."""
        saved = {}
        for name, obj in self.object_patches.items():
            owner, attr = name.rsplit(".", 1)
            target = _get_attr(self.model, owner)
            saved[name] = (target, attr, target.__dict__.get(attr))
            setattr(target, attr, obj)
        try:
            with torch.no_grad():
                return self.model.diffusion_model(x, t, context, time_dim_concat=references,
                                                  transformer_options={"wrappers": self.wrappers})
        finally:
            for target, attr, old in saved.values():
                if old is None:
                    delattr(target, attr)
                else:
                    setattr(target, attr, old)


@pytest.fixture
def native(monkeypatch):
    modules = {name: types.ModuleType(name) for name in
               ("comfy", "comfy.patcher_extension", "comfy.model_base", "comfy.ldm", "comfy.ldm.wan",
                "comfy.ldm.wan.model")}
    modules["comfy.patcher_extension"].WrappersMP = types.SimpleNamespace(DIFFUSION_MODEL=DIFFUSION_MODEL)
    modules["comfy.model_base"].WAN21 = WAN21
    modules["comfy.ldm.wan.model"].WanModel = WanModel
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    modules["comfy"].patcher_extension = modules["comfy.patcher_extension"]
    modules["comfy"].model_base = modules["comfy.model_base"]
    modules["comfy"].ldm = modules["comfy.ldm"]
    modules["comfy.ldm"].wan = modules["comfy.ldm.wan"]
    modules["comfy.ldm.wan"].model = modules["comfy.ldm.wan.model"]
    pack = load_pack()
    pack_nodes(pack)
    return pack.nodes.native


def inputs(k, height=6, width=8):
    g = torch.Generator().manual_seed(k)
    return (torch.randn(1, 4, 3, height, width, generator=g), torch.tensor([500.0]), torch.randn(1, 5, 8, generator=g),
            torch.randn(1, 4, k, height, width, generator=g) if k else None)


def oracle(model, x, t, context, references):
    with torch.no_grad():
        return model.model.diffusion_model._forward(x, t, context, None, references, {}, oracle=True)


@pytest.mark.parametrize("k, height, width", [(1, 6, 8), (2, 6, 8), (3, 5, 7)])
def test_patched_model_gives_reference_tokens_a_zero_cross_attention_update(native, k, height, width):
    plain = ModelPatcher(WAN21(WanModel()))
    patched = native.install_refalign(plain)
    x, t, context, references = inputs(k, height, width)
    expected = oracle(patched, x, t, context, references)
    torch.testing.assert_close(patched(x, t, context, references), expected, rtol=0, atol=1e-6)
    assert (plain(x, t, context, references) - expected).abs().max() > 1e-3  # native alone differs: the gap closed
    assert plain.object_patches == {} and plain.wrappers == {}  # the input MODEL is untouched (a clone was patched)


def test_without_references_the_patched_model_is_the_plain_model_bit_for_bit(native):
    plain = ModelPatcher(WAN21(WanModel()))
    x, t, context, _ = inputs(0)
    assert torch.equal(native.install_refalign(plain)(x, t, context), plain(x, t, context))
    empty = torch.zeros(1, 4, 0, 6, 8)
    assert torch.equal(native.install_refalign(plain)(x, t, context, empty), plain(x, t, context, empty))


class DoubleUpdate:
    """Another pack's object patch on the same cross-attention: wraps what was there."""

    def __init__(self, forward):
        self.forward = forward

    def __call__(self, *args, **kwargs):
        return 2 * self.forward(*args, **kwargs)


def _add_double_update(model):
    other = model.clone()
    for i in range(len(other.get_model_object("diffusion_model.blocks"))):
        key = f"diffusion_model.blocks.{i}.cross_attn.forward"
        other.add_object_patch(key, DoubleUpdate(other.get_model_object(key)))
    return other


@pytest.mark.parametrize("order", ["other first", "refalign first"])
def test_patch_composes_with_another_cross_attention_patch_in_either_order(native, order):
    base = ModelPatcher(WAN21(WanModel()))
    model = native.install_refalign(_add_double_update(base)) if order == "other first" \
        else _add_double_update(native.install_refalign(base))
    for block in base.model.diffusion_model.blocks:  # what DoubleUpdate does, on the oracle's model
        block.cross_attn.forward = DoubleUpdate(block.cross_attn.forward)
    x, t, context, references = inputs(2)
    expected = oracle(base, x, t, context, references)
    for block in base.model.diffusion_model.blocks:
        del block.cross_attn.forward
    torch.testing.assert_close(model(x, t, context, references), expected, rtol=0, atol=1e-6)
    assert native.is_patched(model)


def test_a_clone_onto_another_model_instance_runs_only_that_instances_modules(native):
    """As `clone(model_override=…)` does in ComfyUI 0.38 (multi-GPU replicas, device selection, non-dynamic
    delegates): the object patches are copied verbatim onto a patcher of a second model instance."""
    primary = ModelPatcher(WAN21(WanModel()))
    patched = native.install_refalign(primary)
    second = WanModel()
    with torch.no_grad():
        for p in second.parameters():
            p.add_(0.1 * torch.randn_like(p))
    replica = ModelPatcher(WAN21(second))
    replica.object_patches, replica.wrappers = dict(patched.object_patches), patched.wrappers
    touched = []
    for block in primary.model.diffusion_model.blocks:
        block.cross_attn.register_forward_hook(lambda *_: touched.append(1))
        for layer in (block.cross_attn.q, block.cross_attn.k, block.cross_attn.v):
            layer.register_forward_hook(lambda *_: touched.append(1))
    x, t, context, references = inputs(2)
    torch.testing.assert_close(replica(x, t, context, references), oracle(replica, x, t, context, references),
                               rtol=0, atol=1e-6)
    assert touched == []  # the primary's cross-attention never ran
    torch.testing.assert_close(patched(x, t, context, references), oracle(patched, x, t, context, references),
                               rtol=0, atol=1e-6)


def test_install_is_idempotent_and_refuses_a_non_wan_model(native):
    once = native.install_refalign(ModelPatcher(WAN21(WanModel())))
    twice = native.install_refalign(once)
    assert native.is_patched(twice)
    forward = twice.get_model_object("diffusion_model.blocks.0.cross_attn.forward")
    assert isinstance(forward, native.VideoOnlyCrossAttention) and forward.wrapped is None  # not wrapped twice
    assert len(twice.get_wrappers(DIFFUSION_MODEL, native.PATCH_KEY)) == 1
    assert not native.is_patched(ModelPatcher(WAN21(WanModel())))
    i2v = WanModel()
    i2v.model_type = "i2v"
    for bad in (ModelPatcher(WAN21(i2v)), ModelPatcher(object()), object()):
        with pytest.raises(native.RefAlignInputError, match="model: RefAlign needs a native Wan2.1 text-to-video"):
            native.install_refalign(bad)


def test_video_token_count_follows_wan_padding(native):
    assert native.video_token_count((1, 16, 21, 60, 104), (1, 2, 2)) == 21 * 30 * 52
    assert native.video_token_count((1, 16, 3, 5, 7), (1, 2, 2)) == 3 * 3 * 4


def test_video_only_cross_attention_runs_the_wrapped_forward_on_video_tokens_only(native):
    seen = []

    def forward(x, context, transformer_options=None):
        seen.append(x.shape[1])
        return x + context.mean()

    patch = native.VideoOnlyCrossAttention(0, forward)  # another pack's patch: kept and called
    x, context = torch.randn(1, 10, 4), torch.randn(1, 3, 4)
    out = patch(x, context, transformer_options={native.VIDEO_TOKENS: 6})
    assert seen == [6] and torch.equal(out[:, :6], forward(x[:, :6], context)) and torch.equal(out[:, 6:], torch.zeros(1, 4, 4))
    assert torch.equal(patch(x, context, transformer_options={}), forward(x, context))


class FakeWanVAE:
    """ComfyUI-VAE-like: encode([1, H, W, 3] in [0, 1]) -> [1, 16, frames, H/8, W/8]; records what it was given."""

    def __init__(self):
        self.calls = []

    def encode(self, pixels):
        self.calls.append(pixels.clone())
        pooled = F.avg_pool2d(pixels.permute(0, 3, 1, 2), 8)  # [1, 3, h, w]
        return torch.cat([pooled] * 5 + [pooled[:, :1]], dim=1)[:, :, None]


@pytest.fixture
def conditioning(native, monkeypatch):
    from refalign_core.models.vae import wan21_latent_stats

    helpers = types.ModuleType("node_helpers")
    helpers.conditioning_set_values = lambda cond, values: [[c[0], {**c[1], **values}] for c in cond]
    formats = types.ModuleType("comfy.latent_formats")
    mean, std = wan21_latent_stats()

    class Wan21:
        def process_out(self, latent):
            return latent * std + mean

    formats.Wan21 = Wan21
    monkeypatch.setitem(sys.modules, "node_helpers", helpers)
    monkeypatch.setitem(sys.modules, "comfy.latent_formats", formats)
    monkeypatch.setattr(sys.modules["comfy"], "latent_formats", formats, raising=False)
    pack = sys.modules["refalign_pack"]
    return pack, (mean, std)


def _subjects(pack, images, size=(64, 48)):
    inputs = {f"image_{i + 1}": image for i, image in enumerate(images)}
    return pack_nodes(pack)["RefAlignMultiSubjectReference"].execute(*size, **inputs).result[0]


def test_subject_conditioning_fits_on_white_encodes_each_alone_and_zeroes_the_unconditional(conditioning, caplog):
    pack, (mean, std) = conditioning
    wide_red = torch.zeros(1, 20, 80, 3)
    wide_red[..., 0] = 1.0
    images = [wide_red, torch.rand(1, 30, 30, 3), torch.rand(1, 50, 20, 3)]
    vae = FakeWanVAE()
    positive, negative = [[torch.randn(1, 7, 8), {}]], [[torch.randn(1, 7, 8), {"pooled": None}]]
    node = pack_nodes(pack)["RefAlignSubjectConditioning"]
    pos, neg_text, neg_img_text, latent = node.execute(positive, negative, vae, _subjects(pack, images), 64, 48, 17,
                                                       2, "zeros_per_reference").result
    assert len(vae.calls) == 3 and all(call.shape == (1, 48, 64, 3) for call in vae.calls)  # one 1-frame clip each
    first = vae.calls[0][0]
    assert torch.equal(first[:4], torch.ones(4, 64, 3)) and first[24, 32, 1] < 0.1  # letterboxed on white, not cropped
    references = pos[0][1]["time_dim_concat"]
    assert references.shape == (1, 16, 3, 6, 8) and torch.equal(neg_text[0][1]["time_dim_concat"], references)
    assert torch.equal(references[:, :, 0], vae.encode(vae.calls[0])[:, :, 0])
    uncond = neg_img_text[0][1]["time_dim_concat"]
    assert uncond.shape == references.shape and torch.equal((uncond - mean) / std, torch.zeros_like(uncond))
    assert torch.equal(pos[0][0], positive[0][0]) and neg_img_text[0][1]["pooled"] is None
    assert latent["samples"].shape == (2, 16, 5, 6, 8) and not latent["samples"].any()
    assert "trained with at most 3" not in caplog.text
    _, _, one_frame, _ = node.execute(positive, negative, FakeWanVAE(), _subjects(pack, images), 64, 48, 17, 1,
                                      "one_zero_frame").result
    assert one_frame[0][1]["time_dim_concat"].shape[2] == 1


def test_subject_conditioning_warns_above_three_references_and_refuses_bad_sizes(conditioning, caplog):
    pack, _ = conditioning
    node = pack_nodes(pack)["RefAlignSubjectConditioning"]
    cond = [[torch.randn(1, 7, 8), {}]]
    four = _subjects(pack, [torch.rand(1, 32, 32, 3) for _ in range(4)])
    out = node.execute(cond, cond, FakeWanVAE(), four, 64, 48, 17, 1, "zeros_per_reference").result
    assert out[0][0][1]["time_dim_concat"].shape[2] == 4 and "trained with at most 3" in caplog.text
    with pytest.raises(pack.nodes.native.RefAlignInputError, match="num_frames"):
        node.execute(cond, cond, FakeWanVAE(), four, 64, 48, 16, 1, "zeros_per_reference")


@pytest.mark.parametrize("guidance_steps,window,passes", [
    (None, (0.0, 1.0), [3, 3, 3, 3]), (2, (0.0, 1.0), [3, 3, 1, 1]), (0, (0.0, 1.0), [1, 1, 1, 1]),
    (9, (0.0, 1.0), [3, 3, 3, 3]), (None, (0.5, 1.0), [2, 2, 3, 3]), (3, (0.25, 0.5), [2, 3, 2, 1])])
def test_guider_follows_the_core_step_schedule_on_its_sigmas(native, monkeypatch, guidance_steps, window, passes):
    """The RefAlign Guider finds the step of each sigma SamplerCustomAdvanced gives it (`step_at_sigma`) and runs
    that step's passes by the core's rule (`guidance_mode`): guidance_steps, then the image-guidance window."""
    calls = []

    class CFGGuider:  # ComfyUI's guider, reduced to what ours uses: one predict_noise per sigma but the last
        def __init__(self, model):
            self.inner_model = model

        def inner_set_conds(self, conds):
            self.conds = conds

        def sample(self, noise, latent_image, sampler, sigmas, *args, **kwargs):
            return [self.predict_noise(latent_image, sigma[None]) for sigma in sigmas[:-1]]

    samplers = types.ModuleType("comfy.samplers")
    samplers.CFGGuider = CFGGuider
    samplers.calc_cond_batch = lambda model, conds, x, t, options: calls.append(len(conds)) or [x] * len(conds)
    monkeypatch.setitem(sys.modules, "comfy.samplers", samplers)
    monkeypatch.setattr(sys.modules["comfy"], "samplers", samplers, raising=False)
    native.guider_class.cache_clear()
    guider = native.guider_class()(None)
    guider.set_conds([], [], [])
    guider.set_scales(5.0, 7.5)
    guider.set_guidance_steps(guidance_steps)
    guider.set_image_guidance(*window)
    out = guider.sample(None, torch.ones(1), None, torch.tensor([1.0, 0.8, 0.6, 0.4, 0.0]))
    assert calls == passes
    assert all(torch.allclose(x, torch.ones(1)) for x in out)  # the weights sum to 1 in every mode
    native.guider_class.cache_clear()


def attention(q, k, v, heads, mask=None, **kwargs):
    """ComfyUI's attention call on `[B, L, heads·d]` (as `attention_pytorch`: a 2-D mask broadcasts over B, heads)."""
    b, d = q.shape[0], q.shape[-1] // heads
    q, k, v = (t.view(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2).reshape(b, -1, heads * d)


@pytest.mark.parametrize("strength", [0.0, 0.5, 2.0])
def test_reference_key_bias_scales_the_attention_to_the_reference_keys_in_self_attention_only(native, strength):
    """The native reference_strength: log(strength) added to the reference keys' logits, as the core DiT's bias;
    the video-only cross-attention passes through untouched."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 10, 8, generator=g) for _ in range(3))
    override = native.ReferenceKeyBias(strength, video_tokens=6)
    got = override(attention, q, k, v, heads=2)
    # the oracle: softmax weights on the reference keys multiplied by strength, then renormalised
    qh, kh, vh = (t.view(2, 10, 2, 4).transpose(1, 2) for t in (q, k, v))
    weights = torch.softmax(qh @ kh.transpose(-1, -2) / 2.0, dim=-1)
    weights[..., 6:] *= strength
    expected = (weights / weights.sum(-1, keepdim=True) @ vh).transpose(1, 2).reshape(2, 10, 8)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    text = torch.randn(2, 5, 8, generator=g)
    assert torch.equal(override(attention, q[:, :6], text, text, heads=2), attention(q[:, :6], text, text, heads=2))
    # another pack's override that was there first is still called, with the bias
    seen = []
    chained = native.ReferenceKeyBias(strength, 6, previous=lambda func, *a, **kw: seen.append(kw["mask"]) or func(*a, **kw))
    torch.testing.assert_close(chained(attention, q, k, v, heads=2), got)
    assert seen[0].shape == (1, 10)


def test_the_guider_hands_a_reference_strength_other_than_1_to_the_model(native, monkeypatch):
    """Only a strength ≠ 1 reaches transformer_options (the default run is the one it always was), and the wrapper
    turns it into the attention override when reference frames are present."""
    options = []

    class CFGGuider:
        def __init__(self, model):
            self.inner_model = model

        def inner_set_conds(self, conds):
            self.conds = conds

        def sample(self, noise, latent_image, sampler, sigmas, *args, **kwargs):
            return [self.predict_noise(latent_image, sigma[None], {"transformer_options": {"x": 1}})
                    for sigma in sigmas[:-1]]

    samplers = types.ModuleType("comfy.samplers")
    samplers.CFGGuider = CFGGuider
    samplers.calc_cond_batch = lambda model, conds, x, t, opts: options.append(opts) or [x] * len(conds)
    monkeypatch.setitem(sys.modules, "comfy.samplers", samplers)
    monkeypatch.setattr(sys.modules["comfy"], "samplers", samplers, raising=False)
    native.guider_class.cache_clear()
    try:
        for strength in (1.0, 0.5):
            guider = native.guider_class()(None)
            guider.set_conds([], [], [])
            guider.set_scales(5.0, 7.5)
            guider.set_reference_strength(strength)
            guider.sample(None, torch.ones(1), None, torch.tensor([1.0, 0.5, 0.0]))
    finally:
        native.guider_class.cache_clear()
    assert options[0] == {"transformer_options": {"x": 1}}
    assert options[-1] == {"transformer_options": {"x": 1, native.REFERENCE_STRENGTH: 0.5}}

    class Executor:  # ComfyUI's WrapperExecutor around WanModel._forward: records the options it is handed
        class_obj = types.SimpleNamespace(patch_size=(1, 2, 2))

        def __call__(self, x, timestep, context, clip_fea, time_dim_concat, transformer_options):
            self.options = transformer_options

    def wrapper_options(options, references):  # a 3-frame 4×4 latent: 3·2·2 = 12 video tokens
        executor = Executor()
        native.count_video_tokens(executor, torch.zeros(1, 16, 3, 4, 4), torch.zeros(1), torch.zeros(1, 2, 8), None,
                                  references, options)
        return executor.options

    bias = wrapper_options({native.REFERENCE_STRENGTH: 0.5}, torch.zeros(1, 16, 1, 4, 4))[native.ATTENTION_OVERRIDE]
    assert isinstance(bias, native.ReferenceKeyBias) and (bias.strength, bias.video_tokens) == (0.5, 12)
    assert native.ATTENTION_OVERRIDE not in wrapper_options({native.REFERENCE_STRENGTH: 0.5}, None)
    assert native.ATTENTION_OVERRIDE not in wrapper_options({}, torch.zeros(1, 16, 1, 4, 4))


def test_reference_key_bias_runs_sage_attention_as_pytorch_attention(native, monkeypatch):
    """SageAttention drops masks without a word: with a bias to apply, the self-attention runs ComfyUI's PyTorch
    attention instead, so the strength is not silently lost."""
    attention_module = types.ModuleType("comfy.ldm.modules.attention")
    attention_module.attention_pytorch = attention
    for name in ("comfy.ldm", "comfy.ldm.modules"):
        monkeypatch.setitem(sys.modules, name, sys.modules.get(name) or types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "comfy.ldm.modules.attention", attention_module)

    def attention_sage(q, k, v, heads, mask=None, **kwargs):
        return attention(q, k, v, heads)  # the mask is ignored, as sageattn does

    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 10, 8, generator=g) for _ in range(3))
    override = native.ReferenceKeyBias(0.25, video_tokens=6)
    torch.testing.assert_close(override(attention_sage, q, k, v, heads=2), override(attention, q, k, v, heads=2))
    assert not torch.allclose(override(attention_sage, q, k, v, heads=2), attention(q, k, v, heads=2))
