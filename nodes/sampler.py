"""RefAlign R2V Sampler: model (REFALIGN_MODEL or a RefAlign-patched native MODEL) + references + prompt -> video
frames (IMAGE) and LATENT. The node picks the text, the VAE codec and the denoiser; `refalign_core.pipeline.generate`
runs encode → sample → decode."""

import torch

from ..refalign_core.errors import RefAlignInputError
from ..refalign_core.pipeline import generate
from ..refalign_core.caching import CACHES
from ..refalign_core.sampler import SAMPLERS, UNCOND_REFERENCES, SamplingSettings
from ..refalign_core.text_encoder import WAN_NEGATIVE_PROMPT
from . import runtime
from .loader import RefAlignModel, refalign_model_of
from .native import ComfyVAECodec

MAX_RESOLUTION = 8192


def conditioning_tensor(conditioning, name: str, text_dim: int) -> torch.Tensor:
    """ComfyUI CONDITIONING (list of [tensor, dict]) -> `[1, L, text_dim]`, checking the text width."""
    if not conditioning:
        raise RefAlignInputError(f"{name}: empty conditioning")
    tensor = conditioning[0][0]
    if tensor.ndim != 3 or tensor.shape[-1] != text_dim:
        raise RefAlignInputError(f"{name}: text embeddings of width {tensor.shape[-1]} do not fit this DiT, which "
                                 f"expects {text_dim} (umT5-XXL for Wan2.1); use the Wan text encoder")
    return tensor[:1].float().cpu()


def sampler_text(model: RefAlignModel, positive, negative, prompt: str, negative_prompt: str):
    """(positive, negative) as the denoiser takes them: CONDITIONING for a native model (passed through, so other
    nodes' conditioning keys stay), embeddings for our DiT; from the bundle's text encoder where not connected."""
    if positive is None and model.text_encoder is None:
        raise RefAlignInputError("no prompt: connect positive CONDITIONING (this model has no text encoder)")
    encoded = None
    if model.text_encoder is not None and (positive is None or negative is None):
        encoded = model.encode_prompts([prompt, negative_prompt]).split(1)  # one text-encoder call
    texts = []
    for name, conditioning, fallback in (("positive", positive, 0), ("negative", negative, 1)):
        if conditioning is None:
            texts.append(encoded[fallback] if encoded is not None else torch.zeros_like(texts[0]))
        else:
            tensor = conditioning_tensor(conditioning, name, model.text_dim)
            texts.append(conditioning if model.native is not None else tensor)
    return tuple(texts)


class RefAlignR2VSampler:
    DESCRIPTION = ("Generates a video from the prompt and the subject references with RefAlign three-pass "
                   "guidance: v = u + s_img·(c_img − u) + s_txt·(c_txt − c_img). The model is a REFALIGN_MODEL or a "
                   "native MODEL through RefAlign Model Patch (LoRA loaders and other patches apply; ComfyUI's "
                   "progress bar and previews). Text comes from positive / negative CONDITIONING (Wan text encoder) "
                   "or, for a bundle with a text encoder, from the prompt fields; the VAE is the connected one or the "
                   "bundle's.")
    CATEGORY = "RefAlign"
    FUNCTION = "sample"
    RETURN_TYPES = ("IMAGE", "LATENT")
    RETURN_NAMES = ("frames", "latent")
    OUTPUT_TOOLTIPS = ("The video frames (connect to Create Video / Save Video).",
                       "The video latent in the VAE's space (Wan2.1 VAE space for the Wan VAE), for a native VAE "
                       "Decode.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("REFALIGN_MODEL,MODEL", {"tooltip": "From RefAlign Loader, or a native Wan2.1 MODEL through "
                                                          "RefAlign Model Patch."}),
            "references": ("REFALIGN_REFS", {"tooltip": "From RefAlign Multi-Subject Reference."}),
            "prompt": ("STRING", {"multiline": True, "default": "", "dynamicPrompts": True,
                                  "tooltip": "Used when no positive CONDITIONING is connected (bundle text encoder). "
                                             "Describe each reference subject."}),
            "negative_prompt": ("STRING", {"multiline": True, "default": WAN_NEGATIVE_PROMPT,
                                           "tooltip": "Used when no negative CONDITIONING is connected."}),
            "width": ("INT", {"default": 832, "min": 16, "max": MAX_RESOLUTION, "step": 16,
                              "tooltip": "Video width, a multiple of 16."}),
            "height": ("INT", {"default": 480, "min": 16, "max": MAX_RESOLUTION, "step": 16,
                               "tooltip": "Video height, a multiple of 16."}),
            "length": ("INT", {"default": 81, "min": 1, "max": 1025, "step": 4,
                               "tooltip": "Number of frames, 4n+1 (81 = 5 s at 16 fps)."}),
            "steps": ("INT", {"default": 50, "min": 1, "max": 1000, "tooltip": "Sampling steps."}),
            "shift": ("FLOAT", {"default": 5.0, "min": 0.01, "max": 100.0, "step": 0.1,
                                "tooltip": "Flow-matching timestep shift (RefAlign uses 5). It sets the sampler's "
                                           "sigma schedule, also for a native MODEL."}),
            "image_guidance": ("FLOAT", {"default": 5.0, "min": 0.0, "max": 30.0, "step": 0.1,
                                         "tooltip": "s_img: pull towards the references (official 5.0)."}),
            "text_guidance": ("FLOAT", {"default": 7.5, "min": 0.0, "max": 30.0, "step": 0.1,
                                        "tooltip": "s_txt: pull towards the prompt (official 7.5)."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True,
                             "tooltip": "Noise seed; the same seed gives the same video on every device."}),
            "sampler": (list(SAMPLERS), {"default": "euler", "tooltip": "euler (official) or unipc."}),
            "uncond_references": (list(UNCOND_REFERENCES), {"default": "zeros_per_reference", "tooltip":
                                  "Unconditional pass: K zero reference frames (official inference) or one zero "
                                  "frame (as in training)."}),
        }, "optional": {
            "positive": ("CONDITIONING", {"tooltip": "Prompt from the Wan text encoder (CLIPTextEncode)."}),
            "negative": ("CONDITIONING", {"tooltip": "Negative prompt from the Wan text encoder."}),
            "vae": ("VAE", {"tooltip": "Wan2.1 VAE; when absent, the model bundle's VAE is used."}),
            "three_pass_steps": ("INT", {"default": -1, "min": -1, "max": 1000, "tooltip": "-1: three-pass guidance "
                                 "on every step. n: on the first n steps, then the prompt pass alone (for step-distill "
                                 "LoRAs such as lightx2v: e.g. 4 steps, shift 5, n = 1)."}),
            "cache": (list(CACHES), {"default": "none", "tooltip": "Skip DiT work between steps (diffusers "
                      "FirstBlockCache / MagCache / TaylorSeer; lossy; one state per guidance pass). REFALIGN_MODEL "
                      "with offload block_swap / none; on a native MODEL use EasyCache."}),
            "cache_threshold": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 10.0, "step": 0.01, "tooltip":
                                "first_block / magcache threshold (higher = faster, less exact); taylorseer: full "
                                "evaluation every n steps. 0: the cache's default."}),
            "text_kv_cache": ("BOOLEAN", {"default": False, "tooltip": "Reuse each pass's text keys / values over "
                              "the steps (exact, REFALIGN_MODEL with our DiT)."}),
            "previews": ("BOOLEAN", {"default": True, "tooltip": "Latent previews in the progress bar."}),
        }}

    def sample(self, model, references, prompt, negative_prompt, width, height, length, steps, shift,
               image_guidance, text_guidance, seed, sampler, uncond_references, positive=None, negative=None,
               vae=None, three_pass_steps=-1, cache="none", cache_threshold=0.0, text_kv_cache=False,
               previews=True):
        knob = {} if not cache_threshold else (
            {"cache_interval": max(1, round(cache_threshold))} if cache == "taylorseer"
            else {"cache_threshold": cache_threshold})
        settings = SamplingSettings(width=width, height=height, num_frames=length, steps=steps, shift=shift,
                                    image_scale=image_guidance, text_scale=text_guidance, sampler=sampler,
                                    seed=seed, uncond_references=uncond_references,
                                    guidance_steps=None if three_pass_steps < 0 else min(three_pass_steps, steps),
                                    cache=cache, text_kv_cache=text_kv_cache, **knob)
        model = refalign_model_of(model)
        if vae is None and model.vae is None:
            raise RefAlignInputError("no VAE: connect a Wan2.1 VAE (this model bundle has none)")
        if vae is not None and getattr(vae, "latent_channels", model.in_channels) != model.in_channels:
            raise RefAlignInputError(f"the VAE has {vae.latent_channels} latent channels but the DiT expects "
                                     f"{model.in_channels}: use the Wan2.1 VAE (not the Wan2.2 one)")
        codec = ComfyVAECodec(vae) if vae is not None else model.codec()
        text = sampler_text(model, positive, negative, prompt, negative_prompt)
        # native: ComfyUI's own progress bar and previews
        progress = runtime.Progress(steps, codec if previews else None) if model.native is None else None
        result = generate(model.denoiser(previews), codec, text, settings, references=references.references,
                          callback=progress, cancel_check=runtime.check_interrupted)
        out = runtime.intermediate_device()
        return (result.frames.clamp(0, 1).to(out), {"samples": codec.to_vae_space(result.latents).to(out)})
