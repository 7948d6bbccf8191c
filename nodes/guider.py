"""RefAlign Guider: RefAlign's three-pass guidance as a GUIDER for SamplerCustomAdvanced (any ComfyUI sampler and
scheduler), on the conditionings from RefAlign Subject Conditioning. Mechanism: `native.guider_class`."""

from comfy_api.latest import io

from refalign_core.inference.sampler import MAX_STEPS, SamplingSettings

from .native import guider_class
from .sampler import (CUSTOM, apply_preset, check_model_and_text, guidance_inputs, guidance_steps_input,
                      patched_model_input, preset_input, reference_control_inputs)


def refalign_guider(model, positive, negative_text, negative_img_text, settings: SamplingSettings):
    """The GUIDER (`native.guider_class`) on checked inputs, with the settings' scales and step schedule."""
    check_model_and_text(model, positive=positive, negative_text=negative_text, negative_img_text=negative_img_text)
    guider = guider_class()(model)
    guider.set_conds(positive, negative_text, negative_img_text)
    guider.set_scales(settings.image_scale, settings.text_scale)
    guider.set_guidance_steps(settings.guidance_steps)
    guider.set_image_guidance(settings.image_guidance_start, settings.image_guidance_end)
    guider.set_reference_strength(settings.reference_strength)
    return guider


class RefAlignGuider(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RefAlignGuider", display_name="RefAlign Guider", category="RefAlign",
            description="RefAlign's three-pass guidance, v = u + s_img·(c_img − u) + s_txt·(c_txt − c_img), for "
                        "SamplerCustomAdvanced: connect the three conditionings of RefAlign Subject Conditioning and "
                        "a MODEL with the RefAlign patch. Passes with weight 0 are skipped; guidance_steps ends the "
                        "reference passes early (step-distill LoRAs).",
            inputs=[
                patched_model_input(),
                io.Conditioning.Input("positive", tooltip="Prompt + references (c_txt), from Subject Conditioning."),
                io.Conditioning.Input("negative_text", tooltip="Negative prompt + references (c_img)."),
                io.Conditioning.Input("negative_img_text", tooltip="Negative prompt + zeroed references (u)."),
                *guidance_inputs(),
                guidance_steps_input("-1: three passes on every step. n: on the first n steps of the sigmas, then "
                                       "the prompt pass alone."),
                *reference_control_inputs(),
                preset_input(),
            ],
            outputs=[io.Guider.Output(display_name="guider", tooltip="The guider for SamplerCustomAdvanced.")],
        )

    @classmethod
    def execute(cls, model, positive, negative_text, negative_img_text, image_scale, text_scale,
                guidance_steps=-1, reference_strength=1.0, image_guidance_start=0.0,
                image_guidance_end=1.0, preset=CUSTOM) -> io.NodeOutput:
        # the steps are the sigmas' that SamplerCustomAdvanced gives; MAX_STEPS only bounds guidance_steps here
        settings = SamplingSettings(image_scale=image_scale, text_scale=text_scale, steps=MAX_STEPS,
                                    guidance_steps=None if guidance_steps < 0 else guidance_steps,
                                    reference_strength=reference_strength, image_guidance_start=image_guidance_start,
                                    image_guidance_end=image_guidance_end)
        # the steps and the sampler are SamplerCustomAdvanced's; of a preset only the guidance applies here
        settings = apply_preset(settings, preset).replace(steps=MAX_STEPS)
        return io.NodeOutput(refalign_guider(model, positive, negative_text, negative_img_text, settings))
