"""RefAlign R2V Sampler: a RefAlign-patched MODEL + prompt conditionings + VAE + references -> video frames (IMAGE)
and LATENT, in one node. It is built on the same pieces as the modular wiring (Subject Conditioning → RefAlign Guider
→ SamplerCustomAdvanced): `refalign_core.inference.pipeline.generate` with the native denoiser and the ComfyUI VAE as
codec."""

from comfy_api.latest import io

from refalign_core.errors import RefAlignInputError
from refalign_core.inference.pipeline import generate
from refalign_core.inference.sampler import (FRAMES_PER_LATENT, MAX_GUIDANCE_SCALE, MAX_REFERENCE_STRENGTH, MAX_SEED,
                                             MAX_SHIFT, MAX_STEPS, MIN_SHIFT, PRESETS, SAMPLERS, SIZE_MULTIPLE,
                                             UNCOND_REFERENCES, SamplingSettings, with_preset)

from . import runtime
from .native import ComfyVAECodec, NativeDenoiser, is_patched
from .references import REFERENCES

MAX_RESOLUTION = 8192  # as ComfyUI's own nodes
DEFAULTS = SamplingSettings()  # the widgets' defaults and limits are the core's


def patched_model_input():
    return io.Model.Input("model", tooltip="From RefAlign Loader, or a Wan2.1 MODEL through RefAlign Model Patch.")


def video_size_inputs() -> list:
    return [io.Int.Input("width", default=DEFAULTS.width, min=SIZE_MULTIPLE, max=MAX_RESOLUTION, step=SIZE_MULTIPLE,
                         tooltip=f"Video width, a multiple of {SIZE_MULTIPLE}."),
            io.Int.Input("height", default=DEFAULTS.height, min=SIZE_MULTIPLE, max=MAX_RESOLUTION, step=SIZE_MULTIPLE,
                         tooltip=f"Video height, a multiple of {SIZE_MULTIPLE}."),
            io.Int.Input("num_frames", default=DEFAULTS.num_frames, min=1, max=1025, step=FRAMES_PER_LATENT,
                         tooltip="Number of frames, 4n+1 (81 = 5 s at 16 fps).")]


def guidance_inputs() -> list:
    return [io.Float.Input("image_scale", default=DEFAULTS.image_scale, min=0.0, max=MAX_GUIDANCE_SCALE, step=0.1,
                           tooltip=f"s_img: pull towards the references (official {DEFAULTS.image_scale})."),
            io.Float.Input("text_scale", default=DEFAULTS.text_scale, min=0.0, max=MAX_GUIDANCE_SCALE, step=0.1,
                           tooltip=f"s_txt: pull towards the prompt (official {DEFAULTS.text_scale}).")]


def uncond_references_input():
    return io.Combo.Input("uncond_references", options=list(UNCOND_REFERENCES), default=DEFAULTS.uncond_references,
                          tooltip="Unconditional pass: K zero reference frames (official inference) or one zero frame "
                                  "(as in training).")


def guidance_steps_input(tooltip: str):
    return io.Int.Input("guidance_steps", default=-1, min=-1, max=MAX_STEPS, optional=True, tooltip=tooltip)


def reference_control_inputs() -> list:
    """Reference strength and the image-guidance window: optional, last, so saved workflows keep their values."""
    return [io.Float.Input("reference_strength", default=DEFAULTS.reference_strength, min=0.0,
                           max=MAX_REFERENCE_STRENGTH, step=0.05, optional=True,
                           tooltip="How much the video attends to the references: 1 as trained, 0 ignores them, "
                                   "above 1 leans on them harder."),
            io.Float.Input("image_guidance_start", default=DEFAULTS.image_guidance_start, min=0.0, max=1.0,
                           step=0.01, optional=True,
                           tooltip="The image-guidance pass (s_img) runs from this fraction of the steps…"),
            io.Float.Input("image_guidance_end", default=DEFAULTS.image_guidance_end, min=0.0, max=1.0, step=0.01,
                           optional=True,
                           tooltip="…until this one; outside it a step runs the prompt guidance alone (s_txt), "
                                   "which saves one pass.")]


CUSTOM = "custom"


def preset_input():
    turbo = ", ".join(f"{k} {v}" for k, v in PRESETS["turbo"].items())
    return io.Combo.Input("preset", options=[CUSTOM, *PRESETS], default=CUSTOM, optional=True,
                          tooltip=f"custom: the widgets as set. turbo: for a distilled turbo LoRA (load it with "
                                  f"LoraLoaderModelOnly): {turbo}, in place of those widgets.")


def apply_preset(settings: SamplingSettings, preset: str) -> SamplingSettings:
    return settings if preset == CUSTOM else with_preset(settings, preset)


def check_model_and_text(model, **conditionings) -> None:
    """One clear error for a MODEL without the RefAlign patch or a conditioning of the wrong width."""
    if not hasattr(model, "get_model_object") or not is_patched(model):
        raise RefAlignInputError("model: this MODEL has no RefAlign patch; load it with RefAlign Loader or connect "
                                 "it through RefAlign Model Patch (without it the references would also pass "
                                 "through text cross-attention, as in Phantom)")
    text_dim = model.model.diffusion_model.text_dim
    for name, conditioning in conditionings.items():
        tensor = conditioning[0][0] if conditioning else None
        if tensor is None or tensor.ndim != 3 or tensor.shape[-1] != text_dim:
            got = "nothing" if tensor is None else f"shape {tuple(tensor.shape)}"
            raise RefAlignInputError(f"{name}: text embeddings [1, L, {text_dim}] expected (the Wan text encoder, "
                                     f"or the bundle's CLIP from RefAlign Loader); got {got}")


def check_vae(model, vae) -> None:
    if vae is None:
        raise RefAlignInputError("vae: no VAE; connect Load VAE (wan_2.1_vae), or the VAE output of RefAlign Loader "
                                 "for a bundle")
    in_dim = model.model.diffusion_model.in_dim
    channels = getattr(vae, "latent_channels", in_dim)
    if channels != in_dim:
        raise RefAlignInputError(f"vae: {channels} latent channels but the DiT expects {in_dim}: use the Wan2.1 VAE "
                                 "(not the Wan2.2 one)")


def sample_video(model, positive, negative, vae, references, settings: SamplingSettings, previews: bool = True):
    """(frames `[T, H, W, 3]` in [0, 1], LATENT in the Wan2.1 VAE's space) from the checked inputs."""
    check_model_and_text(model, positive=positive, negative=negative)
    check_vae(model, vae)
    codec = ComfyVAECodec(vae)
    result = generate(NativeDenoiser(model, previews), codec, (positive, negative), settings,
                      references=references.references,
                      reference_latents=references.latents(settings.width, settings.height),
                      cancel_check=runtime.check_interrupted)
    out = runtime.intermediate_device()
    return result.frames.clamp(0, 1).to(out), {"samples": codec.to_vae_space(result.latents).to(out)}


class RefAlignR2VSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RefAlignR2VSampler", display_name="RefAlign R2V Sampler", category="RefAlign",
            description="Generates a video from the prompt and the subject references with RefAlign three-pass "
                        "guidance: v = u + s_img·(c_img − u) + s_txt·(c_txt − c_img), on ComfyUI's own MODEL (LoRA "
                        "loaders and other model patches apply; ComfyUI's progress bar and previews). One node for "
                        "what Subject Conditioning + RefAlign Guider + SamplerCustomAdvanced do step by step.",
            inputs=[
                patched_model_input(),
                io.Conditioning.Input("positive", tooltip="The prompt (CLIP Text Encode); describe each subject."),
                io.Conditioning.Input("negative", tooltip="The negative prompt."),
                io.Vae.Input("vae", tooltip="The Wan2.1 VAE, or a bundle's VAE from RefAlign Loader."),
                REFERENCES.Input("references", tooltip="From RefAlign Multi-Subject Reference."),
                *video_size_inputs(),
                io.Int.Input("steps", default=DEFAULTS.steps, min=1, max=MAX_STEPS, tooltip="Sampling steps."),
                io.Float.Input("shift", default=DEFAULTS.shift, min=MIN_SHIFT, max=MAX_SHIFT, step=0.1,
                               tooltip="Flow-matching timestep shift (RefAlign uses 5); it sets the sigma schedule."),
                *guidance_inputs(),
                io.Int.Input("seed", default=DEFAULTS.seed, min=0, max=MAX_SEED, control_after_generate=True,
                             tooltip="Noise seed; the same seed gives the same video on every device."),
                io.Combo.Input("sampler", options=list(SAMPLERS), default=DEFAULTS.sampler,
                               tooltip="euler (official) or unipc."),
                uncond_references_input(),
                guidance_steps_input("-1: three-pass guidance on every step. n: on the first n steps, then the "
                                       "prompt pass alone (for step-distill LoRAs such as lightx2v: e.g. 4 steps, "
                                       "shift 5, n = 1)."),
                io.Boolean.Input("previews", default=True, optional=True,
                                 tooltip="Latent previews in the progress bar."),
                *reference_control_inputs(),
                preset_input(),
            ],
            outputs=[
                io.Image.Output(display_name="frames", tooltip="The video frames (connect to Create Video / Save "
                                                               "Video)."),
                io.Latent.Output(display_name="latent", tooltip="The video latent in the Wan2.1 VAE's space, for VAE "
                                                                "Decode or further sampling."),
            ],
        )

    @classmethod
    def execute(cls, model, positive, negative, vae, references, width, height, num_frames, steps, shift,
                image_scale, text_scale, seed, sampler, uncond_references, guidance_steps=-1,
                previews=True, reference_strength=1.0, image_guidance_start=0.0,
                image_guidance_end=1.0, preset=CUSTOM) -> io.NodeOutput:
        settings = SamplingSettings(width=width, height=height, num_frames=num_frames, steps=steps, shift=shift,
                                    image_scale=image_scale, text_scale=text_scale, sampler=sampler,
                                    seed=seed, uncond_references=uncond_references,
                                    guidance_steps=None if guidance_steps < 0 else min(guidance_steps, steps),
                                    reference_strength=reference_strength, image_guidance_start=image_guidance_start,
                                    image_guidance_end=image_guidance_end)
        settings = apply_preset(settings, preset)
        return io.NodeOutput(*sample_video(model, positive, negative, vae, references, settings, previews))
