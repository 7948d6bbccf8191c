"""RefAlign Example Image: the pack's example reference images (`examples/refalign_example_*.png`), read in place,
so the toy workflow runs without copying anything into ComfyUI's input folder."""

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..refalign_core.errors import RefAlignInputError

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
PREFIX = "refalign_example_"


def example_images() -> list[str]:
    return sorted(p.name for p in EXAMPLES.glob(f"{PREFIX}*.png"))


def load_example(name: str) -> torch.Tensor:
    """`[1, H, W, 3]` in [0, 1]."""
    if name not in example_images():
        raise RefAlignInputError(f"image: {name!r} is not one of the pack's example images {example_images()}")
    with Image.open(EXAMPLES / name) as image:
        return torch.from_numpy(np.asarray(image.convert("RGB")).copy()).float().div(255)[None]


class RefAlignExampleImage:
    DESCRIPTION = "One of the pack's example reference images (the embedded toy model's subjects)."
    CATEGORY = "RefAlign"
    FUNCTION = "load"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    OUTPUT_TOOLTIPS = ("The example image, for RefAlign Multi-Subject Reference.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": (example_images(), {"tooltip": "An example subject of the toy world."})}}

    def load(self, image):
        return (load_example(image),)
