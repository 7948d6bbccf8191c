"""RefAlign Loader: a DiT file (or a bundle folder with VAE + text encoder) -> REFALIGN_MODEL and a native MODEL.

Inside ComfyUI (offload `comfy_managed`) the DiT is loaded by ComfyUI as its own Wan2.1 model with the RefAlign
patch, so ComfyUI's memory manager, fp8 handling, weight offload and MODEL patches (LoRA loaders, …) apply; with
`block_swap` / `none`, or outside ComfyUI, it is our reference DiT (`refalign_core`)."""

from dataclasses import dataclass, field

import torch

from ..refalign_core.acceleration import ATTENTION_BACKENDS, compile_blocks, set_attention_backend
from ..refalign_core.bundles import embedded_bundles, read_bundle
from ..refalign_core.checkpoint import DTYPES, load_dit
from ..refalign_core.errors import RefAlignInputError
from ..refalign_core.lora import LoraSpec, apply_loras
from ..refalign_core.pipeline import DiTDenoiser, VAECodec
from ..refalign_core.sampler import SamplingSettings
from ..refalign_core.text_encoder import TextEncoder, encode_prompts, load_text_encoder
from ..refalign_core.vae import load_vae
from . import runtime

WEIGHT_DTYPES = {"default": None, **DTYPES}
COMPUTE_DTYPES = {"auto": None, **{name: DTYPES[name] for name in ("fp32", "bf16", "fp16")}}
OFFLOAD = ["comfy_managed", "block_swap", "none"]
NO_LORA = "none"
LORA_SLOTS = 3


@dataclass
class ManagedCodec:
    """A core VAE codec whose VAE ComfyUI's memory manager loads right before each use (not pinned to the GPU)."""

    codec: VAECodec
    patcher: object | None

    def encode_references(self, fitted):
        runtime.load_to_device(self.patcher)
        return self.codec.encode_references(fitted)

    def decode(self, latents):
        runtime.load_to_device(self.patcher)
        return self.codec.decode(latents)

    def to_vae_space(self, latents):
        return self.codec.to_vae_space(latents)


@dataclass
class RefAlignModel:
    """What flows along a REFALIGN_MODEL link: the DiT (a RefAlign-patched native ComfyUI MODEL, or our DiT), a
    bundle's VAE and text encoder (core modules, managed by ComfyUI when it runs), and the model's defaults."""

    name: str
    settings: SamplingSettings = field(default_factory=SamplingSettings)
    fps: float = 16.0
    native: object | None = None  # ComfyUI ModelPatcher over model_base.WAN21, RefAlign-patched
    dit: torch.nn.Module | None = None  # our RefAlignTransformer3DModel otherwise
    vae: torch.nn.Module | None = None
    text_encoder: TextEncoder | None = None
    patchers: dict = field(default_factory=dict)  # "dit" / "vae" / "text_encoder" -> ComfyUI ModelPatcher

    @property
    def in_channels(self) -> int:
        return self.native.model.diffusion_model.in_dim if self.native is not None else self.dit.config.in_channels

    @property
    def text_dim(self) -> int:
        return self.native.model.diffusion_model.text_dim if self.native is not None else self.dit.config.text_dim

    def denoiser(self, previews: bool = True):
        if self.native is not None:
            from .native import NativeDenoiser
            return NativeDenoiser(self.native, previews)
        runtime.load_to_device(self.patchers.get("dit"))
        return DiTDenoiser(self.dit)

    def codec(self) -> ManagedCodec | None:
        return ManagedCodec(VAECodec(self.vae), self.patchers.get("vae")) if self.vae is not None else None

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        runtime.load_to_device(self.patchers.get("text_encoder"))
        return encode_prompts(self.text_encoder, prompts)


def resolve_compute_dtype(choice: str, device: torch.device) -> torch.dtype:
    if COMPUTE_DTYPES[choice] is not None:
        return COMPUTE_DTYPES[choice]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32  # bf16 math is 10–500x slower on CPUs


def _manage(model: RefAlignModel, part: str, module, device) -> None:
    """Hand a core module to ComfyUI's memory manager (kept on the offload device until used), or put it on the
    device outside ComfyUI."""
    patcher = runtime.managed_patcher(module, device, torch.device("cpu"))
    if patcher is None:
        module.to(device)
    else:
        model.patchers[part] = patcher


def apply_native_loras(model, loras: list[tuple[str, str, float]]):
    """LoRAs on a native MODEL through ComfyUI's own LoRA loading (every format ComfyUI reads), as
    LoraLoaderModelOnly does; a file none of whose keys fit this model is one error naming it."""
    import comfy.lora
    import comfy.utils

    if not loras:
        return model
    model = model.clone()
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    for name, path, strength in loras:
        patches = comfy.lora.load_lora(comfy.utils.load_torch_file(path, safe_load=True), key_map, log_missing=False)
        if not patches:
            raise RefAlignInputError(f"LoRA {name}: none of its keys match this Wan2.1 DiT (wrong base model?)")
        model.add_patches(patches, strength)
    return model


def load_refalign_model(name: str, weight_dtype: str, compute_dtype: str, offload: str,
                        loras: list[tuple[str, str, float]] = (), attention_backend: str = "native",
                        compile: bool = False) -> RefAlignModel:
    """loras: (name, path, strength); attention_backend / compile apply to our reference DiT (offload block_swap /
    none); a native model takes ComfyUI's own (--use-sage-attention, TorchCompileModel)."""
    device = runtime.torch_device()
    dtype = resolve_compute_dtype(compute_dtype, device)
    bundles = embedded_bundles() | runtime.bundle_folders()
    bundle = read_bundle(bundles[name]) if name in bundles else None
    dit_path = bundle.dit if bundle else runtime.model_path(name)
    model = RefAlignModel(name=name)
    if bundle:
        model.settings, model.fps = bundle.settings, bundle.fps
    if offload == "comfy_managed" and runtime.native_available():
        from .native import BUNDLE_ATTACHMENT, load_native_dit
        if attention_backend != "native" or compile:
            raise RefAlignInputError("attention_backend / compile: these set up our reference DiT (offload block_swap "
                                     "or none); with comfy_managed use ComfyUI's --use-sage-attention / "
                                     "--use-flash-attention and the TorchCompileModel node")
        native = load_native_dit(dit_path, WEIGHT_DTYPES[weight_dtype], COMPUTE_DTYPES[compute_dtype])
        model.native = apply_native_loras(native, list(loras))
        model.native.set_attachments(BUNDLE_ATTACHMENT, model)
    else:
        model.dit = load_dit(dit_path, compute_dtype=dtype, weight_dtype=WEIGHT_DTYPES[weight_dtype], device="cpu")
        apply_loras(model.dit, [LoraSpec(path, strength) for _, path, strength in loras])
        set_attention_backend(model.dit, attention_backend, device)
        if compile:
            compile_blocks(model.dit)
        if offload == "block_swap" and device.type == "cuda":
            # diffusers group offloading: weights stay on the CPU and stream to the GPU one block at a time
            model.dit.enable_group_offload(onload_device=device, offload_device=torch.device("cpu"),
                                           offload_type="block_level", num_blocks_per_group=1, use_stream=True)
        elif offload == "comfy_managed":
            _manage(model, "dit", model.dit, device)
        elif offload == "none":
            model.dit.to(device)
    if bundle and bundle.vae:
        model.vae = load_vae(bundle.vae, dtype=dtype)
        _manage(model, "vae", model.vae, device)
    if bundle and bundle.text_encoder:
        model.text_encoder = load_text_encoder(bundle.text_encoder, dtype=dtype)
        _manage(model, "text_encoder", model.text_encoder.model, device)
    return model


def refalign_model_of(model) -> RefAlignModel:
    """A REFALIGN_MODEL as is, or a native MODEL (RefAlign-patched) seen as one: its bundle's VAE and text encoder
    when it came from this Loader."""
    if model is None:
        raise RefAlignInputError("model: no model (the Loader's MODEL output exists only with offload "
                                 "comfy_managed inside ComfyUI)")
    if not hasattr(model, "get_attachment"):  # not a ModelPatcher: a REFALIGN_MODEL
        return model
    from .native import BUNDLE_ATTACHMENT, is_patched
    if not is_patched(model):
        raise RefAlignInputError("model: this MODEL has no RefAlign patch; connect it through RefAlign Model Patch "
                                 "(without it the references would also pass through text cross-attention, as in "
                                 "Phantom)")
    source = model.get_attachment(BUNDLE_ATTACHMENT)
    if source is None:
        return RefAlignModel(name="MODEL", native=model)
    parts = {k: v for k, v in source.patchers.items() if k != "dit"}
    return RefAlignModel(name=source.name, settings=source.settings, fps=source.fps, native=model, vae=source.vae,
                         text_encoder=source.text_encoder, patchers=parts)


class RefAlignLoader:
    DESCRIPTION = ("Loads a RefAlign / Wan2.1-T2V DiT (original, ComfyUI or diffusers key names; fp32, bf16, fp16 or "
                   "fp8 weights) from models/refalign or models/diffusion_models, or a bundle folder with its own VAE "
                   "and text encoder (such as the embedded toy model, which runs on CPU without downloads). Inside "
                   "ComfyUI the DiT is a native ComfyUI model with the RefAlign patch, also given as MODEL for LoRA "
                   "loaders and other model patches.")
    CATEGORY = "RefAlign"
    FUNCTION = "load"
    RETURN_TYPES = ("REFALIGN_MODEL", "MODEL")
    RETURN_NAMES = ("model", "native_model")
    OUTPUT_TOOLTIPS = ("The RefAlign model (DiT, plus VAE and text encoder when it is a bundle).",
                       "The same DiT as a native ComfyUI MODEL with the RefAlign patch (offload comfy_managed): "
                       "chain LoRA loaders / model patches, then the R2V Sampler, which still finds the bundle's "
                       "VAE and text encoder.")

    @classmethod
    def INPUT_TYPES(cls):
        runtime.register_model_folder()
        choices = list(embedded_bundles()) + list(runtime.bundle_folders()) + runtime.model_files()
        return {"required": {
            "model_name": (choices, {"tooltip": "A DiT .safetensors from models/refalign or models/diffusion_models "
                                                "(e.g. RefAlign-1.3B), a bundle folder in models/refalign, or the "
                                                "embedded toy model."}),
            "weight_dtype": (list(WEIGHT_DTYPES), {"default": "default", "tooltip": "How the DiT weights are kept in "
                             "memory. fp8 halves memory again; 'default': ComfyUI's choice (native), else the compute "
                             "dtype."}),
            "compute_dtype": (list(COMPUTE_DTYPES), {"default": "auto", "tooltip": "The dtype the DiT computes in. "
                              "auto: ComfyUI's choice (native) / fp32 on CPU, bf16 (or fp16) on GPU."}),
            "offload": (OFFLOAD, {"default": "comfy_managed", "tooltip": "comfy_managed: a native ComfyUI model that "
                        "ComfyUI's memory manager loads, offloads and patches (LoRA via native_model); block_swap: "
                        "our reference DiT with weights in CPU memory, streamed to the GPU block by block (lowest "
                        "VRAM, slower); none: our reference DiT kept on the device."}),
        }, "optional": {**lora_inputs(), **{
            "attention_backend": (list(ATTENTION_BACKENDS), {"default": "native", "tooltip": "Attention kernels of "
                                  "our reference DiT (offload block_swap / none): flash / sage need their package "
                                  "and a CUDA GPU, else native is used. With comfy_managed use ComfyUI's "
                                  "--use-sage-attention."}),
            "compile": ("BOOLEAN", {"default": False, "tooltip": "Regional torch.compile of our reference DiT's "
                        "blocks (offload block_swap / none); with comfy_managed use TorchCompileModel."}),
        }}}

    def load(self, model_name, weight_dtype, compute_dtype, offload, attention_backend="native", compile=False,
             **lora_widgets):
        loras = selected_loras(lora_widgets)
        model = load_refalign_model(model_name, weight_dtype, compute_dtype, offload, loras, attention_backend,
                                    compile)
        return (model, model.native)

    @classmethod
    def VALIDATE_INPUTS(cls, model_name, weight_dtype, compute_dtype, offload, attention_backend="native", **_):
        if weight_dtype not in WEIGHT_DTYPES or compute_dtype not in COMPUTE_DTYPES or offload not in OFFLOAD:
            return "unknown dtype or offload choice"
        if attention_backend not in ATTENTION_BACKENDS:
            return f"attention_backend must be one of {list(ATTENTION_BACKENDS)}"
        return True


def lora_inputs() -> dict:
    """lora_1, lora_1_strength, … (appended after the older widgets, so saved workflows keep their values)."""
    choices = [NO_LORA] + runtime.lora_files()
    inputs = {}
    for i in range(1, LORA_SLOTS + 1):
        inputs[f"lora_{i}"] = (choices, {"default": NO_LORA, "tooltip": "A LoRA from models/loras (ours from "
                               "train.py, ComfyUI, kohya, diffusers, lightx2v step-distill), or none."})
        inputs[f"lora_{i}_strength"] = ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.05,
                                                  "tooltip": "LoRA strength (0 = off)."})
    return inputs


def selected_loras(widgets: dict) -> list[tuple[str, str, float]]:
    """(name, path, strength) of the LoRA slots in use, in slot order."""
    loras = []
    for i in range(1, LORA_SLOTS + 1):
        name, strength = widgets.get(f"lora_{i}", NO_LORA), widgets.get(f"lora_{i}_strength", 1.0)
        if name and name != NO_LORA and strength != 0:
            loras.append((name, runtime.lora_path(name), float(strength)))
    return loras
