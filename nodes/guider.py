"""RefAlign Guider: RefAlign's three-pass guidance as a GUIDER for SamplerCustomAdvanced (any ComfyUI sampler and
scheduler), on the conditionings from RefAlign Subject Conditioning. Mechanism: `native.guider_class`."""

from .native import guider_class
from .sampler import check_model_and_text


class RefAlignGuider:
    DESCRIPTION = ("RefAlign's three-pass guidance, v = u + s_img·(c_img − u) + s_txt·(c_txt − c_img), for "
                   "SamplerCustomAdvanced: connect the three conditionings of RefAlign Subject Conditioning and a "
                   "MODEL with the RefAlign patch. Passes with weight 0 are skipped; three_pass_steps ends the "
                   "reference passes early (step-distill LoRAs).")
    CATEGORY = "RefAlign"
    FUNCTION = "get_guider"
    RETURN_TYPES = ("GUIDER",)
    RETURN_NAMES = ("guider",)
    OUTPUT_TOOLTIPS = ("The guider for SamplerCustomAdvanced.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "From RefAlign Loader, or a Wan2.1 MODEL through RefAlign Model Patch."}),
            "positive": ("CONDITIONING", {"tooltip": "Prompt + references (c_txt), from Subject Conditioning."}),
            "negative_text": ("CONDITIONING", {"tooltip": "Negative prompt + references (c_img)."}),
            "negative_img_text": ("CONDITIONING", {"tooltip": "Negative prompt + zeroed references (u)."}),
            "image_guidance": ("FLOAT", {"default": 5.0, "min": 0.0, "max": 30.0, "step": 0.1,
                                         "tooltip": "s_img: pull towards the references (official 5.0)."}),
            "text_guidance": ("FLOAT", {"default": 7.5, "min": 0.0, "max": 30.0, "step": 0.1,
                                        "tooltip": "s_txt: pull towards the prompt (official 7.5)."}),
        }, "optional": {
            "three_pass_steps": ("INT", {"default": -1, "min": -1, "max": 1000, "tooltip": "-1: three passes on "
                                 "every step. n: on the first n steps of the sigmas, then the prompt pass alone."}),
        }}

    def get_guider(self, model, positive, negative_text, negative_img_text, image_guidance, text_guidance,
                   three_pass_steps=-1):
        check_model_and_text(model, positive=positive, negative_text=negative_text,
                             negative_img_text=negative_img_text)
        guider = guider_class()(model)
        guider.set_conds(positive, negative_text, negative_img_text)
        guider.set_scales(image_guidance, text_guidance)
        guider.set_three_pass_steps(None if three_pass_steps < 0 else three_pass_steps)
        return (guider,)
