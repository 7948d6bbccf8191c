"""RefAlign Example Image: the pack's example reference images (`examples/refalign_example_*.png`), read in place,
so the toy workflow runs without copying anything into ComfyUI's input folder."""

from pathlib import Path

import numpy as np
import torch
from comfy_api.latest import io
from PIL import Image

from refalign_core.errors import RefAlignInputError

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


class RefAlignExampleImage(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RefAlignExampleImage", display_name="RefAlign Example Image", category="RefAlign",
            description="One of the pack's example reference images (the embedded toy model's subjects), read in "
                        "place: nothing is copied into ComfyUI's input folder.",
            inputs=[io.Combo.Input("image", options=example_images(), tooltip="An example subject of the toy world.")],
            outputs=[io.Image.Output(display_name="image", tooltip="The example image, for RefAlign Multi-Subject "
                                                                   "Reference.")],
        )

    @classmethod
    def execute(cls, image) -> io.NodeOutput:
        return io.NodeOutput(load_example(image))
