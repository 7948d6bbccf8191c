"""RefAlign Loader: a DiT file (or a bundle folder with VAE + text encoder) -> REFALIGN_MODEL."""

from dataclasses import dataclass

import torch

from ..refalign_core.demo import SHIPPED_BASELINE, embedded_bundle
from ..refalign_core.pipeline import BUNDLE_FILE
from ..refalign_core.pipeline import RefAlignPipeline
from . import runtime

EMBEDDED = "embedded toy model (CPU demo)"
EMBEDDED_BASELINE = "embedded toy baseline (RA loss off)"
WEIGHT_DTYPES = {"default": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
                 "fp8_e4m3fn": torch.float8_e4m3fn}
COMPUTE_DTYPES = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
OFFLOAD = ["comfy_managed", "block_swap", "none"]


@dataclass
class RefAlignModel:
    """What flows along a REFALIGN_MODEL link."""

    pipeline: RefAlignPipeline
    device: torch.device
    patcher: object | None = None  # ComfyUI ModelPatcher over the DiT, when managed by ComfyUI
    name: str = ""

    def load(self, memory_required: int = 0) -> None:
        """Put the DiT on its device (through ComfyUI's memory manager when managed, evicting other models)."""
        runtime.load_to_device(self.patcher, memory_required)


def resolve_compute_dtype(choice: str, device: torch.device) -> torch.dtype:
    if COMPUTE_DTYPES[choice] is not None:
        return COMPUTE_DTYPES[choice]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32  # bf16 math is 10–500x slower on CPUs


def load_refalign_model(name: str, weight_dtype: str, compute_dtype: str, offload: str) -> RefAlignModel:
    device = runtime.torch_device()
    dtype = resolve_compute_dtype(compute_dtype, device)
    kwargs = dict(compute_dtype=dtype, weight_dtype=WEIGHT_DTYPES[weight_dtype], device="cpu")
    bundles = runtime.bundle_folders()
    if name == EMBEDDED:
        pipeline = RefAlignPipeline.from_bundle(embedded_bundle(), **kwargs)
    elif name == EMBEDDED_BASELINE:
        pipeline = RefAlignPipeline.from_bundle(SHIPPED_BASELINE, **kwargs)
    elif name in bundles:
        pipeline = RefAlignPipeline.from_bundle(bundles[name], **kwargs)
    else:
        pipeline = RefAlignPipeline.from_files(runtime.model_path(name), **kwargs)
    model = RefAlignModel(pipeline=pipeline, device=device, name=name)
    if offload == "block_swap" and device.type == "cuda":
        # diffusers group offloading: weights stay on the CPU and stream to the GPU one block at a time
        pipeline.dit.enable_group_offload(onload_device=device, offload_device=torch.device("cpu"),
                                          offload_type="block_level", num_blocks_per_group=1, use_stream=True)
    elif offload == "comfy_managed":
        model.patcher = runtime.managed_patcher(pipeline.dit, device, torch.device("cpu"))
    if model.patcher is None and offload != "block_swap":
        pipeline.dit.to(device)
    for part in (pipeline.vae, pipeline.text_encoder.model if pipeline.text_encoder else None):
        if part is not None:
            part.to(device)
    return model


class RefAlignLoader:
    DESCRIPTION = ("Loads a RefAlign / Wan2.1-T2V DiT (original, ComfyUI or diffusers key names; fp32, bf16, fp16 or "
                   "fp8 weights) from models/refalign or models/diffusion_models, or a bundle folder with its own VAE "
                   "and text encoder (such as the embedded toy model, which runs on CPU without downloads).")
    CATEGORY = "RefAlign"
    FUNCTION = "load"
    RETURN_TYPES = ("REFALIGN_MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The RefAlign model (DiT, plus VAE and text encoder when it is a bundle).",)

    @classmethod
    def INPUT_TYPES(cls):
        runtime.register_model_folder()
        embedded = [EMBEDDED] + ([EMBEDDED_BASELINE] if (SHIPPED_BASELINE / BUNDLE_FILE).is_file() else [])
        choices = embedded + list(runtime.bundle_folders()) + runtime.model_files()
        return {"required": {
            "model_name": (choices, {"tooltip": "A DiT .safetensors from models/refalign or models/diffusion_models "
                                                "(e.g. RefAlign-1.3B), a bundle folder in models/refalign, or the "
                                                "embedded toy model."}),
            "weight_dtype": (list(WEIGHT_DTYPES), {"default": "default", "tooltip": "How the DiT weights are kept in "
                             "memory. fp8 halves memory again; 'default' keeps them in the compute dtype."}),
            "compute_dtype": (list(COMPUTE_DTYPES), {"default": "auto", "tooltip": "The dtype the DiT computes in. "
                              "auto: fp32 on CPU, bf16 (or fp16) on GPU."}),
            "offload": (OFFLOAD, {"default": "comfy_managed", "tooltip": "comfy_managed: ComfyUI loads the DiT to "
                        "the GPU when sampling and evicts other models; block_swap: weights stay in CPU memory and "
                        "stream to the GPU block by block (lowest VRAM, slower); none: keep it on the device."}),
        }}

    def load(self, model_name, weight_dtype, compute_dtype, offload):
        return (load_refalign_model(model_name, weight_dtype, compute_dtype, offload),)

    @classmethod
    def VALIDATE_INPUTS(cls, model_name, weight_dtype, compute_dtype, offload):
        if weight_dtype not in WEIGHT_DTYPES or compute_dtype not in COMPUTE_DTYPES or offload not in OFFLOAD:
            return "unknown dtype or offload choice"
        return True
