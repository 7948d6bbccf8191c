"""The embedded default model and the demo behind `python -m refalign_core demo`.

The embedded model is the trained toy bundle shipped in the repository (`models/refalign_toy/`, built by
`train/make_toy_bundle.py`). Where that folder is absent (e.g. the package installed without the repository's
`models/`), an untrained tiny bundle (random weights, seed 0) is built once into the user's cache folder so every
stage still runs. The demo runs the full reference-to-video path: fit references on white, VAE-encode, three-pass
guided sampling, decode, write, and score the result with the identity check."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from .bundles import BUNDLE_FILE
from .pipeline import RefAlignPipeline
from .sampler import SamplingSettings
from .text_encoder import load_text_encoder
from .tiny import tiny_dit, tiny_vae, write_tiny_text_encoder
from .toy_world import Subject, reference_image
from .video_io import write_video

DEMO_SETTINGS = SamplingSettings(width=64, height=64, num_frames=17, steps=12)
DEMO_FPS = 8


SHIPPED_BUNDLE = Path(__file__).resolve().parents[1] / "models" / "refalign_toy"
SHIPPED_BASELINE = SHIPPED_BUNDLE.with_name("refalign_toy_baseline")  # same data and steps, RA loss off


def embedded_bundle() -> Path:
    """The shipped toy bundle if present, else an untrained tiny bundle (built on first use in the cache folder)."""
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
                            settings=DEMO_SETTINGS, fps=DEMO_FPS)
    return pipe.save_bundle(folder)


DEMO_PROMPT = "a red plain disc moves right and a blue striped square moves left"
DEMO_SUBJECTS = (Subject("disc", "red", "plain", "red"), Subject("square", "blue", "striped", "pink"))


def demo_references() -> list[Image.Image]:
    """Two toy-world subjects on white: a red disc and a blue square with pink stripes."""
    rng = np.random.default_rng(7)
    return [reference_image(subject, rng, 64)[0] for subject in DEMO_SUBJECTS]


def run_demo(out: Path, bundle: Path | None = None, seed: int = 0, progress=None) -> dict[str, Path]:
    """Generate with the embedded model (or `bundle`), write mp4 + webp, and score the result with the identity
    check (report JSON / text and contact sheet). Returns the written paths."""
    from .identity import IdentitySettings, check_identity
    from .identity_sheet import contact_sheet
    from .vfm import load_vfm

    out = Path(out)
    pipe = RefAlignPipeline.from_bundle(bundle or embedded_bundle())
    references = demo_references()
    result = pipe(DEMO_PROMPT, references, negative_prompt="", seed=seed, callback=progress)
    fps = pipe.fps
    paths = {
        "mp4": write_video(result.frames, out / "demo.mp4", fps=fps),
        "webp": write_video(result.frames, out / "demo.webp", fps=fps),
    }
    names = [s.id for s in DEMO_SUBJECTS]
    report = check_identity(references, result.frames, load_vfm(), names=names,
                            settings=IdentitySettings(sample_frames=len(result.frames)),
                            backbone_name="efficientnet-lite0")
    paths["identity_json"] = out / "identity.json"
    paths["identity_json"].write_text(json.dumps(report.to_dict(), indent=1))
    paths["identity_report"] = out / "identity.txt"
    paths["identity_report"].write_text(report.summary() + "\n")
    paths["contact_sheet"] = out / "contact_sheet.png"
    contact_sheet(report, references, result.frames).save(paths["contact_sheet"])
    return paths
