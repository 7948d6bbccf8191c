"""The toy world sits outside the product: the core reaches the shipped bundles and `ToyVideoVAE` only through
`refalign_core.registry`, whose `EXTENSIONS` is the one place the core names the toy package."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from refalign_core import registry
from refalign_core.errors import RefAlignInputError

ROOT = Path(__file__).parents[2]
CORE = ROOT / "refalign_core"


def fresh(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_the_pipeline_imports_no_toy_and_finds_its_bundles_and_vae_through_the_registry():
    """In one fresh process (each start costs seconds): importing the pipeline imports nothing of the toy or training;
    a toy bundle then loads (its `ToyVideoVAE` found through the registry) and the shipped bundles are listed."""
    folder = CORE / "toy" / "models" / "refalign_toy"
    result = fresh("import sys; from refalign_core.inference.pipeline import RefAlignPipeline;"
                   "print(sorted(m for m in sys.modules if m.startswith(('refalign_core.toy', "
                   "'refalign_core.training'))));"
                   f"pipe = RefAlignPipeline.from_bundle({str(folder)!r});"
                   "print(type(pipe.vae).__name__, 'refalign_core.training' in sys.modules);"
                   "from refalign_core.inference.bundles import embedded_bundles; print(list(embedded_bundles()))")
    assert result.returncode == 0, result.stdout + result.stderr
    imported, loaded, listed = result.stdout.strip().splitlines()
    assert imported == "[]" and loaded.split() == ["ToyVideoVAE", "False"]
    assert "embedded toy model (CPU demo)" in listed


def test_no_core_module_imports_the_toy():
    """Outside `toy/` and `training/` (whose default data is the toy world), no module of the core imports
    `refalign_core.toy` (the CLI's demo command aside); the registry names it as data in `EXTENSIONS`."""
    allowed = {("__main__.py", "toy.demo")}
    for path in CORE.rglob("*.py"):
        relative = path.relative_to(CORE)
        if relative.parts[0] in ("toy", "training"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):  # `from .toy.x import y` names .toy.x; `from . import toy`, .toy
                names = [node.module] if node.module else [a.name for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                bare = name.removeprefix("refalign_core.")
                if bare == "toy" or bare.startswith("toy."):
                    assert (str(relative), bare) in allowed, f"{relative} imports {name}"
    assert registry.EXTENSIONS == (".toy",)  # relative: the core finds the toy beside it


def test_an_unregistered_vae_class_is_a_clear_error(tmp_path):
    from safetensors.torch import save_file
    import torch
    from refalign_core.models.vae import load_vae
    save_file({"w": torch.zeros(1)}, tmp_path / "v.safetensors", metadata={"refalign.vae_class": "FancyVAE"})
    with pytest.raises(RefAlignInputError, match=r"FancyVAE.*registered: \['ToyVideoVAE'\]"):
        load_vae(tmp_path / "v.safetensors")
