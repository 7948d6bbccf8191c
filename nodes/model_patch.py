"""RefAlign Model Patch: a native Wan2.1 T2V MODEL -> the same MODEL with RefAlign semantics (reference tokens skip
text cross-attention; everything else native). Mechanism: `native.install_refalign`."""

from .native import install_refalign


class RefAlignModelPatch:
    DESCRIPTION = ("Makes a native Wan2.1 text-to-video MODEL (e.g. RefAlign-1.3B / -14B from Load Diffusion Model) "
                   "run exactly as RefAlign: the reference frames appended by RefAlign Subject Conditioning (or "
                   "Phantom's node) skip text cross-attention. Composes with LoRA loaders, ModelSamplingSD3, "
                   "TorchCompileModel, EasyCache and attention options; without references it changes nothing.")
    CATEGORY = "RefAlign"
    FUNCTION = "patch"
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The model with the RefAlign patch (for RefAlign Guider + SamplerCustomAdvanced or the RefAlign "
                       "R2V Sampler).",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL", {"tooltip": "A native Wan2.1 T2V model (WAN21)."})}}

    def patch(self, model):
        return (install_refalign(model),)
