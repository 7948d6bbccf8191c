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
