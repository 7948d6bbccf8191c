"""Import a ComfyUI checkout (not shipped, not on PyPI) into this process, and load this node pack into it the
way ComfyUI does. For the scripts that check the pack against the real ComfyUI on a CPU machine."""

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TORCHVISION_OPS = ("nms", "qnms")


def _torchvision_imports() -> bool:
    return subprocess.run([sys.executable, "-c", "import torchvision"], capture_output=True).returncode == 0


def _define_torchvision_ops() -> None:
    """PyPI's torchvision is a CUDA build whose import fails next to the CPU torch ('operator torchvision::nms does
    not exist'); declaring the two operator schemas lets it import (ComfyUI needs none of its C++ ops here)."""
    import torch

    library = torch.library.Library("torchvision", "DEF")
    for op in TORCHVISION_OPS:
        library.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _define_torchvision_ops.library = library  # keep the definitions alive


def make_torchvision_importable() -> None:
    """Call before anything imports torchvision (diffusers and transformers do, through refalign_core)."""
    if importlib.util.find_spec("torchvision") is not None and not hasattr(_define_torchvision_ops, "library") \
            and not _torchvision_imports():
        _define_torchvision_ops()


def open_comfyui(folder: str | Path, cpu: bool = True):
    """Make ComfyUI importable from `folder` (its root, holding main.py) and return the pack module, its nodes
    registered."""
    folder = Path(folder).resolve()
    if not (folder / "comfy" / "model_patcher.py").is_file():
        raise SystemExit(f"{folder} is not a ComfyUI checkout (no comfy/model_patcher.py)")
    make_torchvision_importable()
    sys.path.insert(0, str(folder))
    import comfy.cli_args

    comfy.cli_args.args.cpu = cpu
    import comfy.model_management  # noqa: F401  (reads the args once)
    pack = load_pack()
    pack_nodes(pack)  # registers the nodes as ComfyUI does (and imports `pack.nodes`)
    return pack


def load_pack(name: str = "refalign_pack"):
    """This repository as ComfyUI loads a custom node folder (relative imports, no installed package name)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def pack_nodes(pack) -> dict:
    """The pack's node classes by node id, as ComfyUI registers them (`comfy_entrypoint` → `get_node_list`)."""
    import asyncio

    extension = asyncio.run(pack.comfy_entrypoint())
    return {cls.GET_SCHEMA().node_id: cls for cls in asyncio.run(extension.get_node_list())}


def run_node(pack, node_id: str, *args, **kwargs) -> tuple:
    """One of the pack's nodes run as ComfyUI runs it (`execute`): its outputs."""
    return pack_nodes(pack)[node_id].execute(*args, **kwargs).result


def run_diffusion_model(model, x, t, context, references):
    """A ModelPatcher's diffusion model on DiT-space inputs, with its object patches and wrappers applied (as a
    sampler step would run it, minus ComfyUI's latent-format and sigma conversions)."""
    import torch

    model.patch_model()
    try:
        options = {"wrappers": {k: {kk: list(v) for kk, v in w.items()} for k, w in model.wrappers.items()}}
        with torch.no_grad():
            return model.model.diffusion_model(x, t, context, time_dim_concat=references,
                                               transformer_options=options).float()
    finally:
        model.unpatch_model()
