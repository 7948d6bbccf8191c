"""The core's folders are its architecture: imports run one way between them, and the names that moved in 0.2 still
work with a DeprecationWarning."""

import ast
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
CORE = ROOT / "refalign_core"
# each group imports only from itself and the groups before it; the shared modules from none of the groups
LAYERS = ["shared", "models", "inference", "metrics", "training", "toy", "entry"]
SHARED = {"errors", "files", "paths", "registry", "validation"}
ENTRY = {"__init__", "__main__", "deprecated", "eval", "prepare"}


def group_of(module: str) -> str:
    """'refalign_core.inference.sampler' -> 'inference'; the top-level modules by role."""
    parts = module.split(".")[1:]
    if not parts or parts[0] in ENTRY:
        return "entry"
    return "shared" if parts[0] in SHARED else parts[0]


def imported_core_modules(path: Path) -> list[str]:
    """The core modules `path` imports (relative imports resolved; `from . import x` names the package's x)."""
    package = ".".join(("refalign_core",) + path.relative_to(CORE).parent.parts)
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".")[:len(package.split(".")) - node.level + 1]
            if node.module:
                found.append(".".join(base + [node.module]))
            else:
                found += [".".join(base + [a.name]) for a in node.names]
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
            found += [n for n in names if n and n.startswith("refalign_core.")]
    return found


def test_imports_run_one_way_between_the_groups():
    assert {p.name for p in CORE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()} == \
        set(LAYERS) - {"shared", "entry"}
    upward = []
    for path in CORE.rglob("*.py"):
        own = group_of(".".join(("refalign_core",) + path.relative_to(CORE).with_suffix("").parts))
        for module in imported_core_modules(path):
            target = group_of(module)
            if LAYERS.index(target) > LAYERS.index(own) and not (own, target) == ("training", "toy"):
                upward.append(f"{path.relative_to(ROOT)} ({own}) imports {module} ({target})")
    assert not upward, upward


def test_training_reaches_the_toy_only_for_its_default_data():
    """training -> toy is the one edge against the order: the toy world is training's default dataset."""
    edges = {(str(p.relative_to(CORE)), m) for p in (CORE / "training").rglob("*.py")
             for m in imported_core_modules(p) if group_of(m) == "toy"}
    assert edges and all(m == "refalign_core.toy.world" for _, m in edges), edges


@pytest.mark.parametrize("old,new", [("refalign_core.pipeline", "refalign_core.inference.pipeline"),
                                     ("refalign_core.vae", "refalign_core.models.vae"),
                                     ("refalign_core.identity", "refalign_core.metrics.identity")])
def test_a_moved_module_still_imports_under_its_old_name_with_a_warning(old, new):
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=f"{old} is deprecated.*use {new}"):
        module = __import__(old, fromlist=["_"])
    assert module is sys.modules[new]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert __import__(old, fromlist=["_"]) is module  # cached: warned once


def test_old_entry_points_forward_with_a_warning():
    result = subprocess.run([sys.executable, "-m", "refalign_core.eval", "--help"], capture_output=True, text=True,
                            timeout=120, cwd=ROOT)
    assert result.returncode == 0 and "usage: python -m refalign_core eval" in result.stdout
    assert "DeprecationWarning: python -m refalign_core.eval is deprecated" in result.stderr


def test_renamed_cli_option_is_still_read_with_a_warning(capsys, tmp_path):
    from refalign_core.__main__ import main

    bundle = CORE / "toy" / "models" / "refalign_toy"
    code = main(["generate", "--bundle", str(bundle), "--prompt", "a", "--ref", "x.png", "--frames", "6",
                 "--out", str(tmp_path / "v.mp4")])
    err = capsys.readouterr().err
    assert code == 2 and "--frames is deprecated and will be removed in 0.3: use --num-frames" in err
    assert "num_frames must be 4n+1" in err  # the value reached the setting
