"""A script of the repository (a benchmark, a tool, a train/ script) loaded as a module from its path."""

import importlib.util
from pathlib import Path


def load_script(path: Path, name: str | None = None):
    spec = importlib.util.spec_from_file_location(name or f"script_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
