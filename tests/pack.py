"""Load the node pack the way ComfyUI does (spec_from_file_location on the folder's __init__.py)."""

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def load_pack(name: str = "refalign_pack"):
    for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
        del sys.modules[key]
    spec = importlib.util.spec_from_file_location(name, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def pack_nodes(pack) -> dict:
    """The pack's node classes by node id, as ComfyUI registers them (`comfy_entrypoint` → `get_node_list`), with the
    V3 API stand-in unless a real ComfyUI is loaded."""
    import asyncio

    import comfy_api_stub

    comfy_api_stub.install()
    extension = asyncio.run(pack.comfy_entrypoint())
    return {cls.GET_SCHEMA().node_id: cls for cls in asyncio.run(extension.get_node_list())}


def run_node(cls, **inputs) -> tuple:
    """A node's outputs for these inputs, as ComfyUI runs it (`execute`)."""
    return cls.execute(**inputs).result
