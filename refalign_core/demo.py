"""The embedded default model and the demo behind `python -m refalign_core demo`.

Until the trained toy bundle ships (`models/refalign_toy/` in the repository), the embedded model is an untrained
tiny bundle (random weights, seed 0) built once into the user's cache folder. The demo runs the full
reference-to-video path on it: fit references on white, VAE-encode, three-pass guided sampling, decode, write."""

import os
import shutil
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from .pipeline import BUNDLE_FILE, RefAlignPipeline
from .text_encoder import load_text_encoder
from .tiny import tiny_dit, tiny_vae, write_tiny_text_encoder
from .video_io import write_video

DEMO_DEFAULTS = dict(width=64, height=64, num_frames=17, steps=12, shift=5.0, image_scale=5.0, text_scale=7.5,
                     sampler="euler", fps=8)


SHIPPED_BUNDLE = Path(__file__).resolve().parents[1] / "models" / "refalign_toy"


def embedded_bundle() -> Path:
    """The shipped toy bundle if present, else the random tiny bundle (built on first use in the cache folder)."""
    if (SHIPPED_BUNDLE / BUNDLE_FILE).is_file():
        return SHIPPED_BUNDLE
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "refalign" / "random_tiny_bundle"
    if not (cache / BUNDLE_FILE).is_file():
        tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
        build_random_bundle(tmp)
        cache.parent.mkdir(parents=True, exist_ok=True)
        if not (cache / BUNDLE_FILE).is_file():
            os.replace(tmp, cache)
        else:  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
    return cache


def build_random_bundle(folder: Path) -> Path:
    write_tiny_text_encoder(folder / "text_encoder")
    pipe = RefAlignPipeline(dit=tiny_dit(), vae=tiny_vae(), text_encoder=load_text_encoder(folder / "text_encoder"),
                            defaults=DEMO_DEFAULTS)
    return pipe.save_bundle(folder)


def demo_references() -> list[Image.Image]:
    """Two synthetic subjects: a red disc on a transparent background and a blue-striped box."""
    disc = Image.new("RGBA", (80, 80), (0, 0, 0, 0))
    ImageDraw.Draw(disc).ellipse((8, 8, 72, 72), fill=(220, 40, 40, 255))
    box = Image.new("RGB", (96, 48), (30, 60, 200))
    draw = ImageDraw.Draw(box)
    for x in range(0, 96, 12):
        draw.rectangle((x, 0, x + 5, 47), fill=(240, 240, 250))
    return [disc, box]


def run_demo(out: Path, bundle: Path | None = None, seed: int = 0, progress=None) -> dict[str, Path]:
    out = Path(out)
    pipe = RefAlignPipeline.from_bundle(bundle or embedded_bundle())
    result = pipe("a red ball rolls past a striped box", demo_references(), seed=seed, callback=progress)
    fps = pipe.defaults.get("fps", 16)
    paths = {
        "mp4": write_video(result.frames, out / "demo.mp4", fps=fps),
        "webp": write_video(result.frames, out / "demo.webp", fps=fps),
    }
    refs = (result.references.permute(0, 2, 3, 1).clamp(0, 1) * 255).round().to(torch.uint8)
    sheet = torch.cat(list(refs), dim=1).numpy()
    paths["references"] = out / "references.png"
    Image.fromarray(sheet).save(paths["references"])
    return paths
