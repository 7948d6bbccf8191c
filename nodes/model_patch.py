"""RefAlign Model Patch: a native Wan2.1 T2V MODEL -> the same MODEL with RefAlign semantics (reference tokens skip
text cross-attention; everything else native). Mechanism: `native.install_refalign`."""

from comfy_api.latest import io

from .native import install_refalign


class RefAlignModelPatch(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RefAlignModelPatch", display_name="RefAlign Model Patch", category="RefAlign",
            description="Makes a native Wan2.1 text-to-video MODEL (e.g. RefAlign-1.3B / -14B from Load Diffusion "
                        "Model) run exactly as RefAlign: the reference frames appended by RefAlign Subject "
                        "Conditioning (or Phantom's node) skip text cross-attention. Composes with LoRA loaders, "
                        "ModelSamplingSD3, TorchCompileModel, EasyCache and attention options; without references it "
                        "changes nothing.",
            inputs=[io.Model.Input("model", tooltip="A native Wan2.1 T2V model (WAN21).")],
            outputs=[io.Model.Output(display_name="model", tooltip="The model with the RefAlign patch (for RefAlign "
                                                                   "Guider + SamplerCustomAdvanced or the RefAlign R2V "
                                                                   "Sampler).")],
        )

    @classmethod
    def execute(cls, model) -> io.NodeOutput:
        return io.NodeOutput(install_refalign(model))
