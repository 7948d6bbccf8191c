"""What extends the core without the core importing it: shipped bundle folders (by display name) and VAE classes (by
the class name a saved VAE file's metadata names). An extension package registers its own on import, with
`register_bundle_folder` and `register_vae_class`.

`EXTENSIONS` is the one place the core names an extension package. `load_extensions()` imports those — only when the
shipped bundles are listed or a VAE file names a class nothing has registered yet — so importing the core (e.g.
`refalign_core.inference.pipeline`) imports none of them, and a file's metadata never chooses which module is
imported."""

import importlib
from pathlib import Path

# extension packages, imported on demand (each registers itself on import)
EXTENSIONS = (".toy",)  # the toy world: the embedded toy bundles and their `ToyVideoVAE`

_BUNDLE_FOLDERS: dict[str, Path] = {}
_VAE_CLASSES: dict[str, type] = {}
_loaded = False


def register_bundle_folder(name: str, folder: str | Path) -> None:
    """A shipped bundle folder, listed under its display name (in registration order)."""
    _BUNDLE_FOLDERS[name] = Path(folder)


def register_vae_class(name: str, cls: type) -> None:
    """A VAE class (beyond the Wan2.1 VAE) that a saved VAE file may name in its metadata."""
    _VAE_CLASSES[name] = cls


def load_extensions() -> None:
    """Import the `EXTENSIONS` packages (once), which register what they provide."""
    global _loaded
    if not _loaded:
        for module in EXTENSIONS:
            importlib.import_module(module, package=__package__)
        _loaded = True


def bundle_folders() -> dict[str, Path]:
    """Every registered bundle folder by display name, the extensions loaded."""
    load_extensions()
    return dict(_BUNDLE_FOLDERS)


def vae_class(name: str) -> type | None:
    """The VAE class registered under `name` (the extensions loaded if it is not yet), or None."""
    if name not in _VAE_CLASSES:
        load_extensions()
    return _VAE_CLASSES.get(name)


def vae_class_names() -> list[str]:
    load_extensions()
    return sorted(_VAE_CLASSES)
