"""RefAlign Subject Conditioning: text conditionings + references -> RefAlign's three conditionings and an empty
video latent, for RefAlign Guider + SamplerCustomAdvanced (core DualCFGGuider gives the same guidance: cond1 =
positive, cond2 = negative_text, negative = negative_img_text, cfg_conds = s_txt, cfg_cond2_negative = s_img)."""

import torch
from comfy_api.latest import io

from refalign_core.inference.sampler import SamplingSettings, zero_references

from . import runtime
from .native import ComfyVAECodec, subject_conditioning
from .references import REFERENCES
from .sampler import uncond_references_input, video_size_inputs


def reference_conditionings(positive, negative, vae, references, settings: SamplingSettings, batch_size: int):
    """(positive, negative_text, negative_img_text, LATENT): RefAlign's three conditionings and the empty latent."""
    import comfy.latent_formats

    codec = ComfyVAECodec(vae)
    encoded = references.latents(settings.width, settings.height)  # encoded once (Load Encoded References)
    reference_latents = codec.encode_raw(references.fitted(settings.width, settings.height)) if encoded is None \
        else codec.to_vae_space(encoded)
    zeros = zero_references(reference_latents, settings.uncond_references)
    uncond = comfy.latent_formats.Wan21().process_out(zeros)  # exact zeros again after the model's process_in
    conds = subject_conditioning(positive, negative, reference_latents, uncond)
    shape = (batch_size, *settings.latent_shape(reference_latents.shape[1])[1:])
    return (*conds, {"samples": torch.zeros(shape, device=runtime.intermediate_device())})


class RefAlignSubjectConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RefAlignSubjectConditioning", display_name="RefAlign Subject Conditioning", category="RefAlign",
            description="RefAlign's reference conditioning on the native path (like Wan Phantom Subject To Video, but "
                        "RefAlign's way): each reference is fitted on white (never centre-cropped, masks whiten the "
                        "background), VAE-encoded alone as a 1-frame clip and appended after the video frames; the "
                        "unconditional pass gets exact zero reference latents. Wire the three conditionings into "
                        "RefAlign Guider, and the latent into SamplerCustomAdvanced.",
            inputs=[
                io.Conditioning.Input("positive", tooltip="The prompt (Wan text encoder); describe each subject."),
                io.Conditioning.Input("negative", tooltip="The negative prompt."),
                io.Vae.Input("vae", tooltip="The Wan2.1 VAE."),
                REFERENCES.Input("references", tooltip="From RefAlign Multi-Subject Reference (≤ 3 recommended), or "
                                 "encoded once by RefAlign Save / Load Encoded References."),
                *video_size_inputs(),
                io.Int.Input("batch_size", default=1, min=1, max=4096, tooltip="Videos per run."),
                uncond_references_input(),
            ],
            outputs=[
                io.Conditioning.Output(display_name="positive", tooltip="Prompt + references (c_txt)."),
                io.Conditioning.Output(display_name="negative_text", tooltip="Negative prompt + references (c_img)."),
                io.Conditioning.Output(display_name="negative_img_text",
                                       tooltip="Negative prompt + zeroed references (u)."),
                io.Latent.Output(display_name="latent", tooltip="Empty video latent of the given size."),
            ],
        )

    @classmethod
    def execute(cls, positive, negative, vae, references, width, height, num_frames, batch_size,
                uncond_references) -> io.NodeOutput:
        settings = SamplingSettings(width=width, height=height, num_frames=num_frames,
                                    uncond_references=uncond_references)  # validates the sizes
        return io.NodeOutput(*reference_conditionings(positive, negative, vae, references, settings, batch_size))
