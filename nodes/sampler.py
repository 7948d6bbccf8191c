"""RefAlign R2V Sampler: model + references + prompt -> video frames (IMAGE) and LATENT."""

import torch

from ..refalign_core.errors import RefAlignInputError
from ..refalign_core.references import encode_references
from ..refalign_core.sampler import SAMPLERS, UNCOND_REFERENCES, latent_shape, sample_r2v
from ..refalign_core.text_encoder import WAN_NEGATIVE_PROMPT
from ..refalign_core.vae import decode_latents, latent_stats, wan21_latent_stats
from . import runtime

MAX_RESOLUTION = 8192


def conditioning_tensor(conditioning, name: str, text_dim: int) -> torch.Tensor:
    """ComfyUI CONDITIONING (list of [tensor, dict]) -> `[1, L, text_dim]`."""
    if not conditioning:
        raise RefAlignInputError(f"{name}: empty conditioning")
    tensor = conditioning[0][0]
    if tensor.ndim != 3 or tensor.shape[-1] != text_dim:
        raise RefAlignInputError(f"{name}: text embeddings of width {tensor.shape[-1]} do not fit this DiT, which "
                                 f"expects {text_dim} (umT5-XXL for Wan2.1); use the Wan text encoder")
    return tensor[:1].float().cpu()


def native_encode_references(vae, fitted: torch.Tensor) -> torch.Tensor:
    """ComfyUI VAE: each fitted reference `[3, H, W]` encoded alone as a 1-frame video, normalised to DiT space."""
    latents = [vae.encode(image.permute(1, 2, 0)[None, ..., :3]) for image in fitted]  # each [1, 16, 1, h, w]
    raw = torch.cat([lat.float().cpu() for lat in latents], dim=2)
    mean, std = wan21_latent_stats()
    return (raw - mean) / std


def native_decode(vae, latents: torch.Tensor) -> torch.Tensor:
    mean, std = wan21_latent_stats()
    images = vae.decode(latents * std + mean)
    return images.reshape(-1, *images.shape[-3:]).float()


class RefAlignR2VSampler:
    DESCRIPTION = ("Generates a video from the prompt and the subject references with RefAlign three-pass "
                   "guidance: v = u + s_img·(c_img − u) + s_txt·(c_txt − c_img). Text comes from positive / negative "
                   "CONDITIONING (Wan text encoder) or, for a bundle with a text encoder, from the prompt fields; the "
                   "VAE is the connected one or the bundle's.")
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
            "model": ("REFALIGN_MODEL", {"tooltip": "From RefAlign Loader."}),
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
            "shift": ("FLOAT", {"default": 5.0, "min": 0.0, "max": 100.0, "step": 0.1,
                                "tooltip": "Flow-matching timestep shift (RefAlign uses 5)."}),
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
        }}

    def sample(self, model, references, prompt, negative_prompt, width, height, length, steps, shift,
               image_guidance, text_guidance, seed, sampler, uncond_references, positive=None, negative=None,
               vae=None):
        pipe = model.pipeline
        channels = pipe.dit.config.in_channels
        latent_shape(length, height, width, channels)  # validates length 4n+1 and sizes ÷ 16
        if vae is None and pipe.vae is None:
            raise RefAlignInputError("no VAE: connect a Wan2.1 VAE (this model bundle has none)")
        if vae is not None and getattr(vae, "latent_channels", channels) != channels:
            raise RefAlignInputError(f"the VAE has {vae.latent_channels} latent channels but the DiT expects "
                                     f"{channels}: use the Wan2.1 VAE (not the Wan2.2 one)")
        text_dim = pipe.dit.config.text_dim
        if positive is None and pipe.text_encoder is None:
            raise RefAlignInputError("no prompt: connect positive CONDITIONING (this model has no text encoder)")
        if pipe.text_encoder is not None and (positive is None or negative is None):
            encoded_prompt, encoded_negative = pipe.encode_prompt([prompt, negative_prompt]).split(1)  # one call
        prompt_embeds = conditioning_tensor(positive, "positive", text_dim) if positive is not None else encoded_prompt
        if negative is not None:
            negative_embeds = conditioning_tensor(negative, "negative", text_dim)
        elif pipe.text_encoder is not None:
            negative_embeds = encoded_negative
        else:
            negative_embeds = torch.zeros_like(prompt_embeds)
        fitted = references.fitted(width, height)
        reference_latents = native_encode_references(vae, fitted) if vae is not None else \
            encode_references(pipe.vae, fitted)

        model.load()
        progress = runtime.Progress(steps)
        latents = sample_r2v(pipe.dit, prompt_embeds, negative_embeds, reference_latents, num_frames=length,
                             height=height, width=width, steps=steps, shift=shift, image_scale=image_guidance,
                             text_scale=text_guidance, sampler=sampler, seed=seed % 2**63,
                             uncond_references=uncond_references, callback=progress,
                             cancel_check=runtime.check_interrupted)
        if vae is not None:
            frames = native_decode(vae, latents)
        else:
            frames = decode_latents(pipe.vae, latents)[0].permute(1, 2, 3, 0).add(1).div(2).float()
        mean, std = wan21_latent_stats() if vae is not None else latent_stats(pipe.vae)
        out = runtime.intermediate_device()
        return (frames.clamp(0, 1).to(out), {"samples": (latents * std + mean).to(out)})
