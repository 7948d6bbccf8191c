"""RefAlign on ComfyUI's own Wan2.1 model: the model patch, the three-pass guider, the sampler and the native DiT
loader. ComfyUI is imported inside the functions only.

The patch. ComfyUI's `WanModel` already appends `time_dim_concat` frames after the video on the time axis, continues
RoPE over them and crops the output to the video: RefAlign's token layout. The one difference is that RefAlign's
reference tokens skip text cross-attention. Two pieces install that on a cloned ModelPatcher:

* a `DIFFUSION_MODEL` wrapper (`count_video_tokens`) reads the video token count off the latent's shape and hands
  it down in `transformer_options` (only when reference frames are present: without them nothing changes);
* an object patch on every block's `cross_attn.forward` (`VideoOnlyCrossAttention`) runs that block's
  cross-attention, looked up at call time in the running model, on the leading video tokens and gives the reference
  tokens a zero update.

Why this mechanism: object patches are undone and re-applied by ModelPatcher itself (clones, unloads, other
patchers of the same weights), they wrap whatever forward was there before (another pack's patch included), and the
patched module keeps its weights, so LoRA / fp8 / GGUF / lowvram weight handling applies unchanged. A
`("double_block", i)` replacement would have to re-implement the block and would be displaced by (or displace)
other packs' block replacements.
"""

import functools
import logging
import math
from dataclasses import dataclass

import torch

from refalign_core.models.checkpoint import validated_original
from refalign_core.errors import RefAlignInputError
from refalign_core.models.safetensors_io import read_safetensors, read_safetensors_shapes
from refalign_core.inference.sampler import (GUIDANCE_MODES, SamplingSettings, guidance_mode, guidance_weights,
                                             check_known_latents, initial_noise, make_scheduler, run_schedule,
                                             step_at_sigma, zero_references)
from refalign_core.models.vae import dit_to_wan21_space, wan21_to_dit_space

logger = logging.getLogger(__name__)

PATCH_KEY = "refalign"  # wrapper key on the ModelPatcher
VIDEO_TOKENS = "refalign_video_tokens"  # transformer_options key: leading tokens that are video
RUNNING_MODEL = "refalign_running_model"  # transformer_options key: the WanModel this call runs
REFERENCE_STRENGTH = "refalign_reference_strength"  # transformer_options key: set by the guider when ≠ 1
ATTENTION_OVERRIDE = "optimized_attention_override"  # ComfyUI's transformer_options key around every attention call
BUNDLE_ATTACHMENT = "refalign_bundle"  # ModelPatcher attachment: the RefAlign model (VAE, text encoder) it came from
GUIDANCE_CONDS = ("negative", "negative_text", "positive")  # u, c_img, c_txt


def _cross_attention_key(index: int) -> str:
    return f"diffusion_model.blocks.{index}.cross_attn.forward"


class VideoOnlyCrossAttention:
    """Object patch for `blocks.{index}.cross_attn.forward`: the cross-attention runs on the leading video tokens; the
    trailing reference tokens get a zero update. Without a video token count in `transformer_options` (no
    references) it is the cross-attention itself.

    The cross-attention is found at call time, in the diffusion model that is running (`count_video_tokens` names
    it), never held as a bound method: ComfyUI copies object patches onto clones that wrap another model instance
    (`clone(model_override=…)`: multi-GPU replicas, device selection, non-dynamic delegates), and each must run its
    own modules. Another pack's patch that was there first is kept and called instead."""

    def __init__(self, index: int, wrapped=None):
        self.index = index
        self.wrapped = None if isinstance(getattr(wrapped, "__self__", None), torch.nn.Module) else wrapped

    def _cross_attention(self, transformer_options: dict):
        if self.wrapped is not None:
            return self.wrapped
        model = transformer_options.get(RUNNING_MODEL)
        if model is None:
            raise RuntimeError("RefAlign's cross-attention patch ran without its DIFFUSION_MODEL wrapper")
        module = model.blocks[self.index].cross_attn
        return type(module).forward.__get__(module)

    def __call__(self, x, context, *args, transformer_options=None, **kwargs):
        transformer_options = transformer_options if transformer_options is not None else {}
        forward = self._cross_attention(transformer_options)
        video_tokens = transformer_options.get(VIDEO_TOKENS)
        if video_tokens is None or video_tokens >= x.shape[1]:
            return forward(x, context, *args, transformer_options=transformer_options, **kwargs)
        video = forward(x[:, :video_tokens], context, *args, transformer_options=transformer_options, **kwargs)
        return torch.nn.functional.pad(video, (0, 0, 0, x.shape[1] - video_tokens))


def video_token_count(latent_shape, patch_size) -> int:
    """Tokens of the video part of a `[B, C, T, H, W]` latent (Wan pads each axis up to the patch size)."""
    return math.prod(math.ceil(n / p) for n, p in zip(latent_shape[2:], patch_size))


class ReferenceKeyBias:
    """`optimized_attention_override` that scales the attention paid to the reference keys by `strength` in the
    self-attention over [video | reference] tokens: an additive log(strength) on those keys (−inf at 0), as the
    core DiT's `reference_strength`. Other attention calls (the video-only cross-attention) pass through; an
    override that was there first (another pack's) is called with the bias."""

    def __init__(self, strength: float, video_tokens: int, previous=None):
        self.strength, self.video_tokens, self.previous = strength, video_tokens, previous

    def __call__(self, func, q, k, v, *args, **kwargs):
        axis = 2 if kwargs.get("skip_reshape") else 1
        tokens = q.shape[axis]
        if tokens == k.shape[axis] and tokens > self.video_tokens:
            if kwargs.get("mask") is not None:
                raise RuntimeError("RefAlign reference_strength: the self-attention already has a mask")
            bias = torch.zeros(1, tokens, dtype=q.dtype, device=q.device)
            bias[:, self.video_tokens:] = math.log(self.strength) if self.strength > 0 else float("-inf")
            kwargs["mask"] = bias
            if getattr(func, "__name__", "") == "attention_sage":  # SageAttention drops masks without a word
                from comfy.ldm.modules.attention import attention_pytorch
                func = attention_pytorch
        if self.previous is not None:
            return self.previous(func, q, k, v, *args, **kwargs)
        return func(q, k, v, *args, **kwargs)


def count_video_tokens(executor, x, timestep, context, clip_fea=None, time_dim_concat=None, transformer_options=None,
                       *args, **kwargs):
    """`WrappersMP.DIFFUSION_MODEL` wrapper around `WanModel._forward`: tells the cross-attention patches which model
    is running and, with reference frames present, how many leading tokens are video."""
    transformer_options = {**(transformer_options if transformer_options is not None else {}),
                           RUNNING_MODEL: executor.class_obj}
    if time_dim_concat is not None and time_dim_concat.shape[2] > 0:
        video_tokens = video_token_count(x.shape, executor.class_obj.patch_size)
        transformer_options[VIDEO_TOKENS] = video_tokens
        strength = transformer_options.get(REFERENCE_STRENGTH, 1.0)
        if strength != 1.0:
            transformer_options[ATTENTION_OVERRIDE] = ReferenceKeyBias(strength, video_tokens,
                                                                       transformer_options.get(ATTENTION_OVERRIDE))
    return executor(x, timestep, context, clip_fea, time_dim_concat, transformer_options, *args, **kwargs)


def check_wan_t2v(model) -> None:
    """Refuse anything but a native Wan2.1 text-to-video model (WAN21 around a t2v `WanModel`)."""
    import comfy.ldm.wan.model
    import comfy.model_base

    base = getattr(model, "model", None)
    diffusion_model = getattr(base, "diffusion_model", None)
    if not isinstance(base, comfy.model_base.WAN21) or type(diffusion_model) is not comfy.ldm.wan.model.WanModel \
            or diffusion_model.model_type != "t2v" or diffusion_model.ref_conv is not None:
        kind = f"{type(base).__name__} / {type(diffusion_model).__name__}" if base is not None else type(model).__name__
        raise RefAlignInputError(f"model: RefAlign needs a native Wan2.1 text-to-video MODEL (e.g. RefAlign-1.3B "
                                 f"from Load Diffusion Model); this one is {kind}")


def install_refalign(model):
    """A clone of the ModelPatcher `model` with RefAlign semantics (see the module docstring). Idempotent."""
    import comfy.patcher_extension

    check_wan_t2v(model)
    patched = model.clone()
    for index in range(len(patched.get_model_object("diffusion_model.blocks"))):
        key = _cross_attention_key(index)
        current = patched.get_model_object(key)
        if not isinstance(current, VideoOnlyCrossAttention):
            patched.add_object_patch(key, VideoOnlyCrossAttention(index, current))
    kind = comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL
    patched.remove_wrappers_with_key(kind, PATCH_KEY)
    patched.add_wrapper_with_key(kind, PATCH_KEY, count_video_tokens)
    return patched


def is_patched(model) -> bool:
    """Whether `install_refalign` ran on this patcher (its wrapper survives other packs' patches on top)."""
    import comfy.patcher_extension

    return bool(model.get_wrappers(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, PATCH_KEY))


def subject_conditioning(positive, negative, references, uncond_references):
    """(positive, negative_text, negative_img_text): prompt + references, negative prompt + references, negative
    prompt + the unconditional references; latents in the model's VAE space (as `time_dim_concat`)."""
    import node_helpers

    with_references = lambda cond, latents: node_helpers.conditioning_set_values(cond, {"time_dim_concat": latents})  # noqa: E731
    return with_references(positive, references), with_references(negative, references), \
        with_references(negative, uncond_references)


@functools.cache
def guider_class():
    import comfy.samplers

    class RefAlignGuider(comfy.samplers.CFGGuider):
        """RefAlign's three passes on ComfyUI's sampling machinery (every model patch and wrapper applies):
        x0 = Σ w·x0_pass with the weights of the step's guidance mode (`guidance_weights`); passes with weight 0
        are not run. Conds: positive (c_txt), negative_text (c_img), negative (u: zeroed references). The step
        schedule (guidance_steps, the image-guidance window) is read on whatever sigmas `sample` gets."""

        def set_conds(self, positive, negative_text, negative_img_text):
            self.inner_set_conds({"positive": positive, "negative_text": negative_text,
                                  "negative": negative_img_text})

        guidance_steps = None  # guided passes on every step
        image_guidance = (0.0, 1.0)  # the image pass's window, fractions of the steps
        reference_strength = 1.0
        step_sigmas = None

        def set_scales(self, image_scale: float, text_scale: float):
            self.weights = {mode: dict(zip(GUIDANCE_CONDS, guidance_weights(image_scale, text_scale, mode)))
                            for mode in GUIDANCE_MODES}

        def set_guidance_steps(self, steps: int | None):
            """Guided passes on the first `steps` steps, then c_txt alone (None: on every step)."""
            self.guidance_steps = steps

        def set_image_guidance(self, start: float, end: float):
            """The image pass on start ≤ step / steps < end; outside, u and c_txt only."""
            self.image_guidance = (start, end)

        def set_reference_strength(self, strength: float):
            """How much the video attends to the references (1: as trained)."""
            self.reference_strength = strength

        def sample(self, noise, latent_image, sampler, sigmas, *args, **kwargs):
            self.step_sigmas = sigmas[:-1].float()  # the model is evaluated at every sigma but the last (0)
            return super().sample(noise, latent_image, sampler, sigmas, *args, **kwargs)

        def predict_noise(self, x, timestep, model_options={}, seed=None):
            step = step_at_sigma(float(timestep.max()), self.step_sigmas)
            mode = guidance_mode(step, len(self.step_sigmas), self.guidance_steps, *self.image_guidance)
            weights = self.weights[mode]
            names = [name for name in GUIDANCE_CONDS if weights[name] != 0.0]
            if self.reference_strength != 1.0:
                options = model_options.get("transformer_options", {})
                model_options = {**model_options, "transformer_options": {**options,
                                                                          REFERENCE_STRENGTH: self.reference_strength}}
            outputs = comfy.samplers.calc_cond_batch(self.inner_model, [self.conds.get(n) for n in names], x,
                                                     timestep, model_options)
            return sum(weights[name] * out for name, out in zip(names, outputs))

    return RefAlignGuider


def schedule_sampler(settings: SamplingSettings, multiplier: float = 1000.0, cancel_check=None):
    """A ComfyUI sampler (KSAMPLER) that integrates with the core's scheduler and step (`run_schedule`), so the
    native path takes exactly the core's steps; ComfyUI's callback gets x0 for its previews. The model is evaluated
    at the core's timestep (UniPC rounds it to an integer), given as σ = timestep / `multiplier` (the MODEL's
    `model_sampling.multiplier`, 1000 for Wan)."""
    import comfy.samplers

    def sample(model, x, sigmas, extra_args=None, callback=None, disable=None):
        scheduler = make_scheduler(settings.sampler, settings.steps, settings.shift)
        s_in = x.new_ones([x.shape[0]])
        last = {}

        def velocity(latents, timestep, sigma):
            model_sigma = torch.as_tensor(timestep, dtype=latents.dtype, device=latents.device) / multiplier
            last["x0"] = model(latents, model_sigma * s_in, **(extra_args or {}))
            return (latents - last["x0"]) / model_sigma

        def step_callback(step, steps, latents):
            if callback is not None:
                i = step - 1
                callback({"x": latents, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": last["x0"]})

        return run_schedule(scheduler, x, velocity, callback=step_callback, cancel_check=cancel_check)

    return comfy.samplers.KSAMPLER(sample)


def sample_native(model, positive, negative_text, negative_img_text, latent: torch.Tensor,
                  settings: SamplingSettings, *, preview: bool = True, cancel_check=None,
                  denoise_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Sample through ComfyUI (guider, sampler, memory manager, previews) -> latents in the model's VAE space.
    latent: `[B, 16, T', h, w]` in VAE space (zeros for text/reference-to-video); denoise_mask: ComfyUI's noise mask
    (1: denoise, 0: keep `latent`), e.g. `segment_latent`'s."""
    import latent_preview

    if settings.cache != "none" or settings.text_kv_cache:
        raise RefAlignInputError("cache / text_kv_cache: these hook our reference DiT (CLI and Python API); in "
                                 "ComfyUI use the EasyCache / LazyCache node on the MODEL")
    scheduler = make_scheduler(settings.sampler, settings.steps, settings.shift)
    sigmas = scheduler.sigmas.float()
    multiplier = getattr(model.get_model_object("model_sampling"), "multiplier", 1000.0)
    guider = guider_class()(model)
    guider.set_conds(positive, negative_text, negative_img_text)
    guider.set_scales(settings.image_scale, settings.text_scale)
    guider.set_guidance_steps(settings.guidance_steps)
    guider.set_image_guidance(settings.image_guidance_start, settings.image_guidance_end)
    guider.set_reference_strength(settings.reference_strength)
    noise = initial_noise(tuple(latent.shape), settings.seed)
    callback = latent_preview.prepare_callback(model, settings.steps) if preview else None
    samples = guider.sample(noise, latent, schedule_sampler(settings, multiplier, cancel_check), sigmas,
                            callback=callback, denoise_mask=denoise_mask, seed=settings.seed)
    return samples.float()


@dataclass
class ComfyVAECodec:
    """A ComfyUI VAE (Wan2.1) as the core's video codec: each fitted reference `[3, H, W]` encoded alone as a
    1-frame clip; DiT space = (z − mean) / std with the Wan2.1 statistics."""

    vae: object

    def encode_raw(self, fitted: torch.Tensor) -> torch.Tensor:
        """`[K, 3, H, W]` in [0, 1] -> `[1, 16, K, H/8, W/8]` in the VAE's own space."""
        latents = [self.vae.encode(image.permute(1, 2, 0)[None, ..., :3]) for image in fitted]  # each [1,16,1,h,w]
        return torch.cat([latent.float().cpu() for latent in latents], dim=2)

    def encode_references(self, fitted: torch.Tensor) -> torch.Tensor:
        return wan21_to_dit_space(self.encode_raw(fitted))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        images = self.vae.decode(self.to_vae_space(latents))
        return images.reshape(-1, *images.shape[-3:]).float().cpu()

    def encode_video(self, frames: torch.Tensor) -> torch.Tensor:
        """frames `[4n+1, H, W, 3]` in [0, 1] -> `[1, 16, n+1, H/8, W/8]` in DiT space."""
        return wan21_to_dit_space(self.vae.encode(frames[..., :3]).float().cpu())

    def to_vae_space(self, latents: torch.Tensor) -> torch.Tensor:
        return dit_to_wan21_space(latents)


def segment_latent(shape: tuple[int, ...], known: torch.Tensor | None = None):
    """(latent, noise mask) of a clip `shape` = [B, C, T', h, w] in VAE space: zeros, or a segment that starts from
    `known` `[1, C, P, h, w]` (held: mask 0 there, 1 elsewhere). Without `known` the mask is None (all denoised)."""
    latent = torch.zeros(shape)
    if known is None:
        return latent, None
    check_known_latents(known, (1, *shape[1:]))
    latent[:, :, :known.shape[2]] = known
    mask = torch.ones(shape[0], 1, *shape[2:])
    mask[:, :, :known.shape[2]] = 0.0
    return latent, mask


def _as_conditioning(text):
    return text if isinstance(text, list) else [[text, {}]]


@dataclass
class NativeDenoiser:
    """A RefAlign-patched native MODEL as the core's `Denoiser`: latents in, latents out in DiT space (converted
    with the model's own latent format). text: (positive, negative) CONDITIONING, or embedding tensors."""

    model: object

    preview: bool = True

    def __call__(self, text, reference_latents, settings, *, callback=None, cancel_check=None,
                 known_latents=None) -> torch.Tensor:
        latent_format = self.model.model.latent_format
        positive, negative = (_as_conditioning(t) for t in text)
        conds = subject_conditioning(
            positive, negative, latent_format.process_out(reference_latents),
            latent_format.process_out(zero_references(reference_latents, settings.uncond_references)))
        shape = settings.latent_shape(latent_format.latent_channels)
        known = None if known_latents is None else latent_format.process_out(known_latents)
        latent, mask = segment_latent(shape, known)
        samples = sample_native(self.model, *conds, latent, settings, preview=self.preview,
                                cancel_check=cancel_check, denoise_mask=mask)
        return latent_format.process_in(samples).cpu()


def native_config_overrides(config: dict) -> dict:
    """`WanModel` arguments from our inferred config that ComfyUI's detection would get wrong for this file
    (it assumes 128-wide heads, 4096-d text and a 256-d sinusoid, true for every released Wan2.1 DiT)."""
    return {"num_heads": config["num_attention_heads"], "text_dim": config["text_dim"],
            "freq_dim": config["freq_dim"], "eps": config["eps"]}


def load_native_dit(path, model_options: dict | None = None, patch: bool = True, disable_dynamic: bool = False):
    """A RefAlign / Wan2.1 T2V DiT file as a native ComfyUI MODEL (ModelPatcher over `model_base.WAN21`), with the
    RefAlign patch unless `patch` is False. model_options: as UNETLoader's (`dtype` for fp8 storage, …).

    A file that ComfyUI reads as it is (original key names, one .safetensors, released head / text widths) goes
    through `comfy.sd.load_diffusion_model`, ComfyUI's own path (memory-mapped, scaled-fp8 conversion, and the
    `cached_patcher_init` that multi-GPU clones and device selection need). Other files (diffusers names, sharded,
    our toy shapes) are checked and converted here and built from ComfyUI's model config with those values set; they
    get a `cached_patcher_init` that rebuilds them the same way (unpatched, as ComfyUI expects). `disable_dynamic`
    is what ComfyUI ≥ 0.38 passes to that factory; this branch always builds a plain (non-dynamic) ModelPatcher."""
    import comfy.sd

    options = dict(model_options or {})
    shapes, metadata = read_safetensors_shapes(path, "DiT checkpoint")
    original, config = validated_original(shapes, metadata, str(path), dequantize=False)
    overrides = _config_overrides(original, config)
    if not overrides and set(original) == set(shapes) and str(path).endswith(".safetensors"):
        model = comfy.sd.load_diffusion_model(str(path), model_options=options)
    else:
        model = _load_with_overrides(path, options, overrides)
        model.cached_patcher_init = (load_native_dit, (str(path), options, False))
    return install_refalign(model) if patch else model


def _config_overrides(original: dict, config: dict) -> dict:
    """`WanModel` arguments that ComfyUI's detection would get wrong for this state dict (meta tensors suffice)."""
    import comfy.model_detection

    detected = comfy.model_detection.detect_unet_config(original, "")
    defaults = {"text_dim": 4096}  # WanModel's default where detection leaves the key out
    return {k: v for k, v in native_config_overrides(config).items() if detected.get(k, defaults.get(k)) != v}


def _load_with_overrides(path, options: dict, overrides: dict):
    """ComfyUI's model config for the file, with `overrides` set, its weights loaded (a legacy ModelPatcher)."""
    import comfy.model_detection
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.utils

    state_dict, metadata = read_safetensors(path, "DiT checkpoint")
    state_dict, _ = validated_original(state_dict, metadata, str(path), dequantize=False)
    if hasattr(comfy.utils, "convert_old_quants"):  # ComfyUI ≥ 0.38 reads scaled fp8 only after this conversion
        state_dict, metadata = comfy.utils.convert_old_quants(state_dict, "", metadata=metadata)
    model_config = comfy.model_detection.model_config_from_unet(state_dict, "")
    model_config.unet_config.update(overrides)
    load_device = mm.get_torch_device()
    dtype = options.get("dtype") or mm.unet_dtype(model_params=comfy.utils.calculate_parameters(state_dict),
                                                  supported_dtypes=model_config.supported_inference_dtypes,
                                                  weight_dtype=comfy.utils.weight_dtype(state_dict))
    model_config.set_inference_dtype(dtype, mm.unet_manual_cast(dtype, load_device,
                                                                model_config.supported_inference_dtypes))
    if options.get("fp8_optimizations"):
        model_config.optimizations["fp8"] = True
    base = model_config.get_model(state_dict, "").to(mm.unet_offload_device())
    base.load_model_weights(state_dict, "")
    return comfy.model_patcher.ModelPatcher(base, load_device=load_device, offload_device=mm.unet_offload_device())
