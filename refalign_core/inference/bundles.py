"""The bundle format: a folder holding `refalign_bundle.json`, which names the DiT, VAE and text-encoder paths
(relative to the folder) and the model's generation defaults (`SamplingSettings` fields plus `fps`)."""

import json
import os
from dataclasses import dataclass
from pathlib import Path

from .. import registry
from ..errors import RefAlignInputError
from ..paths import inside
from .sampler import SamplingSettings

BUNDLE_FILE = "refalign_bundle.json"
DEFAULT_FPS = 16.0
BUNDLE_KEYS = {"format", "version", "dit", "vae", "text_encoder", "defaults"}


@dataclass(frozen=True)
class Bundle:
    folder: Path
    dit: Path
    vae: Path | None
    text_encoder: Path | None
    settings: SamplingSettings
    fps: float


def embedded_bundles() -> dict[str, Path]:
    """The shipped bundles by their display name (those present), as extensions register them (`registry.py`)."""
    return {label: folder for label, folder in registry.bundle_folders().items() if (folder / BUNDLE_FILE).is_file()}


def read_bundle(folder: str | os.PathLike) -> Bundle:
    """A bundle folder, its JSON checked: an object with `dit` (and optionally `vae`, `text_encoder`) as paths inside
    the folder (or absolute), `defaults` as `SamplingSettings` fields plus `fps`; anything else is one error."""
    folder = Path(folder)
    manifest_path = folder / BUNDLE_FILE
    where = f"bundle {manifest_path}"
    if not manifest_path.is_file():
        raise RefAlignInputError(f"bundle: {folder} has no {BUNDLE_FILE}")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise RefAlignInputError(f"{where}: not a readable JSON file: {e}") from e
    if not isinstance(manifest, dict):
        raise RefAlignInputError(f"{where}: expected a JSON object, got {type(manifest).__name__}")
    unknown = sorted(set(manifest) - BUNDLE_KEYS)
    if unknown:
        raise RefAlignInputError(f"{where}: unknown key(s) {unknown}; known: {sorted(BUNDLE_KEYS)}")
    if manifest.get("format", "refalign-bundle") != "refalign-bundle":
        raise RefAlignInputError(f"{where}: format must be 'refalign-bundle', got {manifest.get('format')!r}")
    if "dit" not in manifest:
        raise RefAlignInputError(f"{where}: names no 'dit'")
    paths = {k: inside(folder, manifest[k], f"{where} {k}") if manifest.get(k) is not None else None
             for k in ("dit", "vae", "text_encoder")}
    defaults = manifest.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise RefAlignInputError(f"{where}: defaults must be an object of settings, got {defaults!r}")
    defaults = dict(defaults)
    fps = defaults.pop("fps", DEFAULT_FPS)
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not 0 < fps < 1000:
        raise RefAlignInputError(f"{where}: defaults.fps must be a number in (0, 1000), got {fps!r}")
    settings = SamplingSettings.from_dict(defaults, source=f"{where} defaults")
    return Bundle(folder, paths["dit"], paths["vae"], paths["text_encoder"], settings, float(fps))


def write_bundle_manifest(folder: Path, settings: SamplingSettings, fps: float, *, vae: bool, text_encoder: bool,
                          dit: str = "dit.safetensors") -> Path:
    """Write `refalign_bundle.json` for files already saved in `folder` as dit.safetensors / vae.safetensors /
    text_encoder/."""
    defaults = {k: v for k, v in settings.to_dict().items() if k != "seed"} | {"fps": fps}
    manifest = {"format": "refalign-bundle", "version": 1, "dit": dit, "defaults": defaults}
    if vae:
        manifest["vae"] = "vae.safetensors"
    if text_encoder:
        manifest["text_encoder"] = "text_encoder"
    path = Path(folder) / BUNDLE_FILE
    path.write_text(json.dumps(manifest, indent=1))
    return path
