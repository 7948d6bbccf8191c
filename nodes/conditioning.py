"""RefAlign Subject Conditioning: text conditionings + references -> RefAlign's three conditionings and an empty
video latent, for RefAlign Guider + SamplerCustomAdvanced (core DualCFGGuider gives the same guidance: cond1 =
positive, cond2 = negative_text, negative = negative_img_text, cfg_conds = s_txt, cfg_cond2_negative = s_img)."""

import torch

from ..refalign_core.sampler import UNCOND_REFERENCES, SamplingSettings, zero_references
from . import runtime
from .native import ComfyVAECodec, subject_conditioning

MAX_RESOLUTION = 8192


class RefAlignSubjectConditioning:
    DESCRIPTION = ("RefAlign's reference conditioning on the native path (like Wan Phantom Subject To Video, but "
                   "RefAlign's way): each reference is fitted on white (never centre-cropped, masks whiten the "
                   "background), VAE-encoded alone as a 1-frame clip and appended after the video frames; the "
                   "unconditional pass gets exact zero reference latents. Wire the three conditionings into RefAlign "
                   "Guider, and the latent into SamplerCustomAdvanced.")
    CATEGORY = "RefAlign"
    FUNCTION = "encode"
    RETURN_TYPES = ("CONDITIONING", "CONDITIONING", "CONDITIONING", "LATENT")
    RETURN_NAMES = ("positive", "negative_text", "negative_img_text", "latent")
    OUTPUT_TOOLTIPS = ("Prompt + references (c_txt).", "Negative prompt + references (c_img).",
                       "Negative prompt + zeroed references (u).", "Empty video latent of the given size.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "positive": ("CONDITIONING", {"tooltip": "The prompt (Wan text encoder); describe each subject."}),
            "negative": ("CONDITIONING", {"tooltip": "The negative prompt."}),
            "vae": ("VAE", {"tooltip": "The Wan2.1 VAE."}),
            "references": ("REFALIGN_REFS", {"tooltip": "From RefAlign Multi-Subject Reference (≤ 3 recommended)."}),
            "width": ("INT", {"default": 832, "min": 16, "max": MAX_RESOLUTION, "step": 16,
                              "tooltip": "Video width, a multiple of 16."}),
            "height": ("INT", {"default": 480, "min": 16, "max": MAX_RESOLUTION, "step": 16,
                               "tooltip": "Video height, a multiple of 16."}),
            "length": ("INT", {"default": 81, "min": 1, "max": 1025, "step": 4,
                               "tooltip": "Number of frames, 4n+1."}),
            "batch_size": ("INT", {"default": 1, "min": 1, "max": 4096, "tooltip": "Videos per run."}),
            "uncond_references": (list(UNCOND_REFERENCES), {"default": "zeros_per_reference", "tooltip":
                                  "Unconditional pass: K zero reference frames (official inference) or one zero "
                                  "frame (as in training)."}),
        }}

    def encode(self, positive, negative, vae, references, width, height, length, batch_size, uncond_references):
        import comfy.latent_formats

        settings = SamplingSettings(width=width, height=height, num_frames=length,
                                    uncond_references=uncond_references)  # validates the sizes
        reference_latents = ComfyVAECodec(vae).encode_raw(references.fitted(width, height))
        zeros = zero_references(reference_latents, uncond_references)
        uncond = comfy.latent_formats.Wan21().process_out(zeros)  # exact zeros again after the model's process_in
        conds = subject_conditioning(positive, negative, reference_latents, uncond)
        shape = (batch_size, *settings.latent_shape(reference_latents.shape[1])[1:])
        latent = torch.zeros(shape, device=runtime.intermediate_device())
        return (*conds, {"samples": latent})
