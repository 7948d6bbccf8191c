"""The bundle format: a folder holding `refalign_bundle.json`, which names the DiT, VAE and text-encoder paths
(relative to the folder) and the model's generation defaults (`SamplingSettings` fields plus `fps`)."""

import json
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import RefAlignInputError
from .sampler import SamplingSettings

BUNDLE_FILE = "refalign_bundle.json"
DEFAULT_FPS = 16.0


@dataclass(frozen=True)
class Bundle:
    folder: Path
    dit: Path
    vae: Path | None
    text_encoder: Path | None
    settings: SamplingSettings
    fps: float


def read_bundle(folder: str | os.PathLike) -> Bundle:
    folder = Path(folder)
    manifest_path = folder / BUNDLE_FILE
    if not manifest_path.is_file():
        raise RefAlignInputError(f"bundle: {folder} has no {BUNDLE_FILE}")
    manifest = json.loads(manifest_path.read_text())
    paths = {k: folder / manifest[k] if manifest.get(k) else None for k in ("dit", "vae", "text_encoder")}
    if paths["dit"] is None:
        raise RefAlignInputError(f"bundle: {manifest_path} names no 'dit'")
    defaults = dict(manifest.get("defaults") or {})
    fps = defaults.pop("fps", DEFAULT_FPS)
    settings = SamplingSettings.from_dict(defaults, source=f"bundle {manifest_path} defaults")
    return Bundle(folder, paths["dit"], paths["vae"], paths["text_encoder"], settings, fps)


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
