"""The few ComfyUI runtime helpers the nodes call, imported lazily so the pack imports (and is tested) without
ComfyUI. Outside ComfyUI they fall back to plain CPU behaviour."""

import os

from ..refalign_core.bundles import BUNDLE_FILE
from ..refalign_core.errors import RefAlignInputError


def comfy_available() -> bool:
    import importlib
    try:
        for name in ("folder_paths", "comfy.model_management"):
            importlib.import_module(name)
    except ImportError:
        return False
    return True


def native_available() -> bool:
    """ComfyUI's own model and sampling machinery (not just the helpers) is importable: the native path applies."""
    import importlib
    try:
        for name in ("comfy.model_base", "comfy.samplers", "comfy.ldm.wan.model", "comfy.patcher_extension",
                     "node_helpers", "latent_preview"):
            importlib.import_module(name)
    except ImportError:
        return False
    return True


def torch_device():
    import torch
    if comfy_available():
        import comfy.model_management as mm
        return mm.get_torch_device()
    return torch.device("cpu")


def intermediate_device():
    import torch
    if comfy_available():
        import comfy.model_management as mm
        return mm.intermediate_device()
    return torch.device("cpu")


def check_interrupted() -> bool:
    """Raises ComfyUI's InterruptProcessingException when the user pressed Cancel; False otherwise."""
    if comfy_available():
        import comfy.model_management as mm
        mm.throw_exception_if_processing_interrupted()
    return False


MAX_PREVIEW_SIZE = 512


def previews_enabled() -> bool:
    """False when ComfyUI runs with `--preview-method none`."""
    if not comfy_available():
        return False
    from comfy.cli_args import LatentPreviewMethod, args
    return args.preview_method != LatentPreviewMethod.NoPreviews


class Progress:
    """ComfyUI's ProgressBar when available (websocket progress), with a latent preview of the newest frame after
    every step when a codec is given (the latent -> RGB map is fitted on that VAE, see `refalign_core.previews`)."""

    def __init__(self, total: int, codec=None):
        self.bar, self.preview = None, None
        if comfy_available():
            import comfy.utils
            from ..refalign_core.previews import LatentPreview
            self.bar = comfy.utils.ProgressBar(total)
            if codec is not None and previews_enabled():
                self.preview = LatentPreview(codec, self._show)

    def _show(self, step, total, image):
        if max(image.size) > MAX_PREVIEW_SIZE:
            image.thumbnail((MAX_PREVIEW_SIZE, MAX_PREVIEW_SIZE))
        self.bar.update_absolute(step, total, ("JPEG", image, MAX_PREVIEW_SIZE))

    def __call__(self, step: int, total: int, latents=None) -> None:
        if self.bar is None:
            return
        if self.preview is not None and latents is not None:
            self.preview(step, total, latents)
        else:
            self.bar.update_absolute(step, total)


def register_model_folder() -> None:
    """`models/refalign` (created if missing), also listing `models/diffusion_models`."""
    if not comfy_available():
        return
    import folder_paths
    path = os.path.join(folder_paths.models_dir, "refalign")
    os.makedirs(path, exist_ok=True)
    if "refalign" in folder_paths.folder_names_and_paths:
        paths, _ = folder_paths.folder_names_and_paths["refalign"]
        if path not in paths:
            paths.append(path)
    else:
        folder_paths.folder_names_and_paths["refalign"] = ([path], set(folder_paths.supported_pt_extensions))


def model_files() -> list[str]:
    if not comfy_available():
        return []
    import folder_paths
    register_model_folder()
    files = set(folder_paths.get_filename_list("refalign"))
    files |= set(folder_paths.get_filename_list("diffusion_models"))
    return sorted(f for f in files if f.endswith(".safetensors") or f.endswith(".index.json"))


def model_path(name: str) -> str:
    import folder_paths
    register_model_folder()
    for key in ("refalign", "diffusion_models"):
        path = folder_paths.get_full_path(key, name)
        if path:
            return path
    raise RefAlignInputError(f"model_name: {name} is in neither models/refalign nor models/diffusion_models")


def lora_files() -> list[str]:
    """LoRA files in ComfyUI's `models/loras`."""
    if not comfy_available():
        return []
    import folder_paths
    return sorted(f for f in folder_paths.get_filename_list("loras") if f.endswith(".safetensors"))


def lora_path(name: str) -> str:
    import folder_paths
    path = folder_paths.get_full_path("loras", name)
    if not path:
        raise RefAlignInputError(f"LoRA {name} is not in models/loras")
    return path


def bundle_folders() -> dict[str, str]:
    """Bundle folders (holding refalign_bundle.json) inside models/refalign: display name -> path."""
    if not comfy_available():
        return {}
    import folder_paths
    register_model_folder()
    found = {}
    for root in folder_paths.get_folder_paths("refalign"):
        if os.path.isdir(root):
            for entry in sorted(os.listdir(root)):
                if os.path.isfile(os.path.join(root, entry, BUNDLE_FILE)):
                    found[f"bundle: {entry}"] = os.path.join(root, entry)
    return found


def managed_patcher(module, load_device, offload_device):
    """Wrap a torch module (our DiT, a bundle's VAE or umT5) in ComfyUI's ModelPatcher so `load_models_gpu` loads it
    when it is used and evicts it (or other models) when memory is short.

    The patcher writes bookkeeping attributes (`device`, `model_lowvram`, …) onto the model it manages, and a
    diffusers model's `device` is a read-only property, so it manages a plain holder module around the module."""
    if not comfy_available():
        return None
    import torch
    import comfy.model_management as mm
    import comfy.model_patcher

    holder = torch.nn.Module()
    holder.diffusion_model = module
    holder.device = offload_device
    return comfy.model_patcher.ModelPatcher(holder, load_device=load_device, offload_device=offload_device,
                                            size=mm.module_size(module))


def load_to_device(patcher, memory_required: int = 0) -> None:
    """Load a managed module onto the compute device through ComfyUI's memory manager (no-op when unmanaged)."""
    if patcher is not None:
        import comfy.model_management as mm
        mm.load_models_gpu([patcher], memory_required=memory_required)


def temp_image_output(image, prefix: str) -> list[dict]:
    """Save a PIL image into ComfyUI's temp folder and return the UI entry that shows it on the node."""
    if not comfy_available():
        return []
    import folder_paths
    folder = folder_paths.get_temp_directory()
    os.makedirs(folder, exist_ok=True)
    index = len([f for f in os.listdir(folder) if f.startswith(prefix)])
    name = f"{prefix}_{index:05d}.png"
    image.save(os.path.join(folder, name))
    return [{"filename": name, "subfolder": "", "type": "temp"}]


def install_example_images() -> None:
    """Copy the pack's example reference images into ComfyUI's input folder (once), so the toy workflow's
    LoadImage nodes find them. Does nothing outside ComfyUI."""
    if not comfy_available():
        return
    import shutil
    import folder_paths
    source = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
    target = folder_paths.get_input_directory()
    try:
        os.makedirs(target, exist_ok=True)
        for name in sorted(os.listdir(source)):
            if name.endswith(".png") and not os.path.exists(os.path.join(target, name)):
                shutil.copyfile(os.path.join(source, name), os.path.join(target, name))
    except OSError:
        pass  # a read-only input folder only means the toy workflow's images must be picked by hand
