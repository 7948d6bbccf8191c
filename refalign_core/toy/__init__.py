"""The toy world and the embedded default model: a synthetic multi-subject world (`world.py`), its small video
autoencoder (`vae.py`), its text encoder (`text_model.py`), the demo (`demo.py`) and the shipped bundles
(`models/`). Nothing in the inference path imports this package: the core finds the shipped bundles
and `ToyVideoVAE` through `refalign_core.registry`, where this package registers them on import (the registry's
`EXTENSIONS` names it, so it is imported when those are asked for)."""

from pathlib import Path

from ..registry import register_bundle_folder, register_vae_class
from .vae import ToyVideoVAE

MODELS_FOLDER = Path(__file__).resolve().parent / "models"
# the shipped bundles: display name -> folder under MODELS_FOLDER (the first is the embedded default model)
EMBEDDED = {"embedded toy model (CPU demo)": "refalign_toy",
            "embedded toy baseline (RA loss off)": "refalign_toy_baseline"}

for _label, _name in EMBEDDED.items():
    register_bundle_folder(_label, MODELS_FOLDER / _name)
register_vae_class("ToyVideoVAE", ToyVideoVAE)
