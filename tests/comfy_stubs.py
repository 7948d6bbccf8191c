"""Minimal stand-ins for the ComfyUI runtime helpers the nodes call (installed in sys.modules by a fixture)."""

import os
import sys
import types

import torch


class InterruptProcessingException(Exception):
    pass


def install(root) -> dict:
    """Fake `folder_paths`, `comfy.model_management`, `comfy.utils`, `comfy.model_patcher`, `comfy.cli_args`,
    `comfy.patcher_extension` rooted at `root`."""
    state = {"interrupt": False, "progress": [], "loaded": [], "previews": []}
    models = os.path.join(root, "models")
    folder_paths = types.ModuleType("folder_paths")
    folder_paths.models_dir = models
    folder_paths.supported_pt_extensions = {".safetensors", ".ckpt", ".pt"}
    folder_paths.folder_names_and_paths = {
        "diffusion_models": ([os.path.join(models, "diffusion_models")], folder_paths.supported_pt_extensions),
        "loras": ([os.path.join(models, "loras")], folder_paths.supported_pt_extensions)}

    def get_folder_paths(key):
        return folder_paths.folder_names_and_paths[key][0]

    def get_filename_list(key):
        out = []
        for base in get_folder_paths(key):
            for dirpath, _, files in os.walk(base):
                out += [os.path.relpath(os.path.join(dirpath, f), base) for f in files]
        return sorted(out)

    def get_full_path(key, name):
        for base in get_folder_paths(key):
            if os.path.isfile(os.path.join(base, name)):
                return os.path.join(base, name)
        return None

    folder_paths.get_folder_paths = get_folder_paths
    folder_paths.get_filename_list = get_filename_list
    folder_paths.get_full_path = get_full_path
    folder_paths.get_temp_directory = lambda: os.path.join(root, "temp")
    folder_paths.get_input_directory = lambda: os.path.join(root, "input")

    comfy = types.ModuleType("comfy")
    mm = types.ModuleType("comfy.model_management")
    mm.InterruptProcessingException = InterruptProcessingException
    mm.get_torch_device = lambda: torch.device("cpu")
    mm.intermediate_device = lambda: torch.device("cpu")
    mm.module_size = lambda m: sum(p.numel() * p.element_size() for p in m.parameters())

    def throw():
        if state["interrupt"]:
            raise InterruptProcessingException()

    mm.throw_exception_if_processing_interrupted = throw
    mm.load_models_gpu = lambda models, memory_required=0: state["loaded"].append(models)
    utils = types.ModuleType("comfy.utils")

    class ProgressBar:
        def __init__(self, total):
            self.total = total

        def update_absolute(self, value, total=None, preview=None):
            state["progress"].append((value, total))
            if preview is not None:
                state["previews"].append(preview)

    utils.ProgressBar = ProgressBar
    patcher = types.ModuleType("comfy.model_patcher")

    class ModelPatcher:
        def __init__(self, model, load_device, offload_device, size=0):
            self.model, self.load_device, self.offload_device, self.size = model, load_device, offload_device, size

    patcher.ModelPatcher = ModelPatcher
    cli_args = types.ModuleType("comfy.cli_args")

    class LatentPreviewMethod:
        NoPreviews, Auto = "none", "auto"

    cli_args.LatentPreviewMethod = LatentPreviewMethod
    cli_args.args = types.SimpleNamespace(preview_method=LatentPreviewMethod.Auto)
    extension = types.ModuleType("comfy.patcher_extension")
    extension.WrappersMP = types.SimpleNamespace(DIFFUSION_MODEL="diffusion_model")
    comfy.model_management, comfy.utils, comfy.model_patcher, comfy.cli_args = mm, utils, patcher, cli_args
    comfy.patcher_extension = extension
    sys.modules.update({"folder_paths": folder_paths, "comfy": comfy, "comfy.model_management": mm,
                        "comfy.utils": utils, "comfy.model_patcher": patcher, "comfy.cli_args": cli_args,
                        "comfy.patcher_extension": extension})
    return state


def uninstall() -> None:
    for name in ("folder_paths", "comfy", "comfy.model_management", "comfy.utils", "comfy.model_patcher",
                 "comfy.cli_args", "comfy.patcher_extension"):
        sys.modules.pop(name, None)
