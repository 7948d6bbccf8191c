"""The few ComfyUI runtime helpers the nodes call, imported lazily so the pack imports (and is tested) without
ComfyUI. Outside ComfyUI they fall back to plain CPU behaviour."""

import os

from refalign_core.inference.bundles import BUNDLE_FILE
from refalign_core.errors import RefAlignInputError


def comfy_available() -> bool:
    import importlib
    try:
        for name in ("folder_paths", "comfy.model_management"):
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


def register_model_folder(name: str = "refalign", extensions=None) -> None:
    """Registers `models/<name>` with ComfyUI's `folder_paths` (default `models/refalign`, listed with
    `models/diffusion_models`), for files with `extensions` (default: ComfyUI's weight files); the folder is not
    created. A path that extra_model_paths.yaml registered under that name first stays first."""
    if not comfy_available():
        return
    import folder_paths
    path = os.path.join(folder_paths.models_dir, name)
    if name in folder_paths.folder_names_and_paths:
        paths, _ = folder_paths.folder_names_and_paths[name]
        if path not in paths:
            paths.append(path)
    else:
        folder_paths.folder_names_and_paths[name] = ([path], set(extensions or folder_paths.supported_pt_extensions))


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
    raise RefAlignInputError(f"unet_name: {name} is in neither models/diffusion_models nor models/refalign")


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
    """Wrap a torch module (a bundle's VAE or text encoder) in ComfyUI's ModelPatcher so `load_models_gpu` loads it
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
