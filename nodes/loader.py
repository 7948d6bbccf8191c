"""RefAlign Loader: a RefAlign / Wan2.1 T2V DiT file, or a bundle folder, -> ComfyUI's own MODEL with the RefAlign
patch, plus the bundle's text encoder as CLIP and its VAE as VAE (None for a plain DiT file: use Load CLIP and Load
VAE). The DiT is loaded by ComfyUI (`native.load_native_dit`), so its memory manager, fp8 weights, LoRA loaders and
model patches apply."""

import torch
from comfy_api.latest import io

from refalign_core.inference.bundles import embedded_bundles, read_bundle
from refalign_core.errors import RefAlignInputError
from refalign_core.models.text_encoder import load_text_encoder
from refalign_core.models.vae import load_vae

from . import runtime
from .bundle_models import BundleCLIP, BundleVAE
from .native import load_native_dit

WEIGHT_DTYPES = {"default": None, "fp8_e4m3fn": "float8_e4m3fn", "fp8_e4m3fn_fast": "float8_e4m3fn",
                 "fp8_e5m2": "float8_e5m2"}  # UNETLoader's choices


def model_options(weight_dtype: str) -> dict:
    """ComfyUI `model_options` for a weight_dtype choice, as UNETLoader builds them."""
    if weight_dtype not in WEIGHT_DTYPES:
        raise RefAlignInputError(f"weight_dtype: {weight_dtype!r}; expected one of {list(WEIGHT_DTYPES)}")
    options = {}
    if WEIGHT_DTYPES[weight_dtype] is not None:
        options["dtype"] = getattr(torch, WEIGHT_DTYPES[weight_dtype])
    if weight_dtype.endswith("_fast"):
        options["fp8_optimizations"] = True
    return options


def model_choices() -> list[str]:
    return list(embedded_bundles()) + list(runtime.bundle_folders()) + runtime.model_files()


def load_refalign(unet_name: str, weight_dtype: str = "default"):
    """(MODEL, CLIP or None, VAE or None) for a name from `model_choices()`."""
    options = model_options(weight_dtype)
    bundles = embedded_bundles() | runtime.bundle_folders()
    if unet_name not in bundles:
        return load_native_dit(runtime.model_path(unet_name), options), None, None
    bundle = read_bundle(bundles[unet_name])
    model = load_native_dit(bundle.dit, options)
    clip = BundleCLIP(load_text_encoder(bundle.text_encoder)) if bundle.text_encoder else None
    vae = BundleVAE(load_vae(bundle.vae)) if bundle.vae else None
    return model, clip, vae


class RefAlignLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        runtime.register_model_folder()
        return io.Schema(
            node_id="RefAlignLoader", display_name="RefAlign Loader", category="RefAlign",
            description="Loads a RefAlign / Wan2.1-T2V DiT (original, ComfyUI or diffusers key names; fp32, bf16, fp16 "
                        "or fp8 weights) from models/diffusion_models or models/refalign as a native ComfyUI MODEL "
                        "with the RefAlign patch, or a bundle folder with its own text encoder and VAE (such as the "
                        "embedded toy model, which runs on CPU without downloads). Chain LoRA loaders and model "
                        "patches on its MODEL.",
            inputs=[
                io.Combo.Input("unet_name", options=model_choices(), tooltip="A DiT .safetensors from "
                               "models/diffusion_models or models/refalign (e.g. RefAlign-1.3B), a bundle folder in "
                               "models/refalign, or the embedded toy model."),
                io.Combo.Input("weight_dtype", options=list(WEIGHT_DTYPES), default="default", tooltip="How the DiT "
                               "weights are kept in memory, as in Load Diffusion Model; fp8 halves memory."),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="The DiT as a native ComfyUI MODEL with the RefAlign "
                                                              "patch."),
                io.Clip.Output(display_name="clip", tooltip="A bundle's text encoder (for CLIP Text Encode); none for "
                                                            "a plain DiT file: use Load CLIP (umt5_xxl, type wan)."),
                io.Vae.Output(display_name="vae", tooltip="A bundle's VAE; none for a plain DiT file: use Load VAE "
                                                          "(wan_2.1_vae)."),
            ],
        )

    @classmethod
    def execute(cls, unet_name, weight_dtype) -> io.NodeOutput:
        return io.NodeOutput(*load_refalign(unet_name, weight_dtype))
