"""Names that changed in 0.2 and still work, with a DeprecationWarning, until 0.3.

Modules: the core's flat modules moved into `models/`, `inference/` and `metrics/`; `import refalign_core.pipeline`
(any old module name) gives the module at its new place, the same object. The entry points `python -m
refalign_core.eval` / `.prepare` became the subcommands `python -m refalign_core eval` / `prepare`
(`eval.py` and `prepare.py` forward)."""

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

PACKAGE = __name__.rpartition(".")[0]
MOVED_MODULES = {  # old module name -> its group
    **dict.fromkeys(("transformer_refalign", "checkpoint", "vae", "text_encoder", "lora", "vfm", "safetensors_io"),
                    "models"),
    **dict.fromkeys(("pipeline", "sampler", "references", "caching", "acceleration", "memory", "previews", "bundles",
                     "video_io"), "inference"),
    **dict.fromkeys(("identity", "identity_sheet", "faces"), "metrics"),
}


def warn(old: str, new: str) -> None:
    """A DeprecationWarning attributed to the user's line (the first frame outside this file and the import system),
    so Python's default filters show it where that line is `__main__`."""
    frame, level = sys._getframe(), 1
    while frame.f_back is not None and (frame.f_code.co_filename == __file__
                                        or frame.f_code.co_filename.startswith("<frozen importlib")):
        frame = frame.f_back
        level += not frame.f_code.co_filename.startswith("<frozen importlib")  # warnings skips those itself
    warnings.warn(f"{old} is deprecated and will be removed in 0.3: use {new}", DeprecationWarning, stacklevel=level)


class MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves an old module name (asked for after the real finders found no file) to the module's new place."""

    def find_spec(self, fullname, path=None, target=None):
        package, _, name = fullname.rpartition(".")
        if package == PACKAGE and name in MOVED_MODULES:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        name = spec.name.rpartition(".")[2]
        new = f"{PACKAGE}.{MOVED_MODULES[name]}.{name}"
        warn(spec.name, new)
        return importlib.import_module(new)

    def exec_module(self, module) -> None:
        pass  # the module is already executed at its new place


def install() -> None:
    if not any(isinstance(f, MovedModuleFinder) for f in sys.meta_path):
        sys.meta_path.append(MovedModuleFinder())
