"""The embedded default model and the demo behind `python -m refalign_core demo`.

The embedded model is the trained toy bundle shipped with the package (`refalign_core/toy/models/refalign_toy/`,
built by `train/make_toy_bundle.py`). The demo runs the full reference-to-video
path — fit references on white, VAE-encode, three-pass guided sampling, decode, write — and scores the result with
the world judge (`judge.py`: the right subject in each lane, per frame) and with the Identity Check, each next to its
ceiling: the judge on the toy world's own clip of the demo case after the bundle's VAE (the most a DiT can reach with
that VAE), the Identity Check on that clip as rendered."""

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import RefAlignInputError
from ..inference.bundles import BUNDLE_FILE
from ..inference.pipeline import RefAlignPipeline
from ..inference.sampler import SamplingSettings, with_preset
from ..models.lora import LoraSpec
from ..inference.video_io import write_video
from . import MODELS_FOLDER
from .judge import JUDGE_FILE, WorldJudge, through_vae
from .world import BACKGROUND, FRAMES, SIZE, Subject, caption, plan_tracks, reference_image, render_clip

DEMO_SETTINGS = SamplingSettings(width=SIZE, height=SIZE, num_frames=FRAMES, steps=12)
SHIPPED_BUNDLE = MODELS_FOLDER / "refalign_toy"
SHIPPED_BASELINE = MODELS_FOLDER / "refalign_toy_baseline"  # same data and steps, RA loss off
SHIPPED_TURBO = MODELS_FOLDER / "refalign_toy_turbo" / "lora.safetensors"  # the shipped model's turbo student


def embedded_bundle() -> Path:
    """The shipped toy bundle (part of the package; `train/make_toy_bundle.py` rebuilds it)."""
    if not (SHIPPED_BUNDLE / BUNDLE_FILE).is_file():
        raise RefAlignInputError(f"the embedded toy model is missing: {SHIPPED_BUNDLE / BUNDLE_FILE} does not exist "
                                 f"(reinstall the package, or rebuild it with train/make_toy_bundle.py)")
    return SHIPPED_BUNDLE


# a red disc gliding right above a blue square with pink stripes gliding left (both training identities)
DEMO_TRACKS = tuple(plan_tracks([Subject("disc", "red", "plain", "red"), Subject("square", "blue", "striped", "pink")],
                                [1, -1]))
DEMO_PROMPT = caption(list(DEMO_TRACKS))  # "a disc moves right and a square moves left"
DEMO_NAMES = tuple(track.subject.id for track in DEMO_TRACKS)


def demo_references() -> list[Image.Image]:
    """The two demo subjects on white."""
    rng = np.random.default_rng(7)
    return [reference_image(track.subject, rng, SIZE)[0] for track in DEMO_TRACKS]


def frame_strip(references: list[Image.Image], frames, gap: int = 8) -> Image.Image:
    """The references, a gap, then every frame, side by side at the video's height."""
    height = frames.shape[1]
    tiles = [image.convert("RGB").resize((height * image.width // image.height, height)) for image in references]
    tiles += [Image.fromarray((frame.clamp(0, 1) * 255).round().byte().numpy()) for frame in frames]
    strip = Image.new("RGB", (sum(t.width for t in tiles) + gap, height), (255, 255, 255))
    x = 0
    for i, tile in enumerate(tiles):
        strip.paste(tile, (x, 0))
        x += tile.width + (gap if i == len(references) - 1 else 0)
    return strip


def score_demo(pipe: RefAlignPipeline, references: list, frames) -> tuple[str, dict, "Image.Image"]:
    """The demo video `frames` scored by the world judge (`judge_accuracy` per subject) and the Identity Check, each
    next to its ceiling on the world's own clip of the case. Returns (report text, JSON summary, contact sheet)."""
    from ..metrics.identity import IdentitySettings, check_identity
    from ..metrics.identity_sheet import evaluate
    from ..models.vfm import load_vfm

    names = list(DEMO_NAMES)
    subjects = [track.subject for track in DEMO_TRACKS]
    judge = WorldJudge.load() if JUDGE_FILE.is_file() else None
    verdict = judge(frames, subjects, names) if judge else None
    vfm = load_vfm()
    settings = IdentitySettings(sample_frames=len(frames))
    report, sheet = evaluate(references, frames, vfm, names=names, settings=settings,
                             backbone_name="efficientnet-lite0")
    ceiling = judge_ceiling = None
    if tuple(frames.shape[1:3]) == (SIZE, SIZE):  # the world renders the case at its own size
        truth = render_clip(list(DEMO_TRACKS), BACKGROUND, frames.shape[0], SIZE)
        ceiling = check_identity(references, truth, vfm, names=names, settings=settings)
        if judge is not None:
            judge_ceiling = judge(through_vae(pipe.vae, truth), subjects, names)
    text = report.summary()
    summary = report.to_dict() | {"ceiling": {s.name: s.mean for s in ceiling.subjects} if ceiling else None}
    if ceiling is not None:
        text += "\n  ceiling (the same check on the toy world's own clip of this case): " + ", ".join(
            f"{s.name} {s.mean:.3f} ({r.mean / s.mean:.0%} of it)" for s, r in zip(ceiling.subjects, report.subjects))
    if verdict is not None:
        text += "\n" + verdict.summary()
        summary["judge_accuracy"] = {s.name: s.accuracy for s in verdict.subjects}
        summary["judge"] = verdict.to_dict()
    if judge_ceiling is not None:
        text += "\n  judge ceiling (the world's own clip of this case through the bundle's VAE): " + ", ".join(
            f"{s.name} {s.accuracy:.0%}" for s in judge_ceiling.subjects)
        summary["judge_ceiling"] = {s.name: s.accuracy for s in judge_ceiling.subjects}
    return text, summary, sheet


def run_demo(out: Path, bundle: Path | None = None, seed: int = 0, progress=None,
             preset: str | None = None) -> dict[str, Path]:
    """Generate with the embedded model (or `bundle`), write mp4 + webp, and score the result (`score_demo`: report
    JSON / text, contact sheet). preset "turbo": the embedded model's turbo student (its LoRA) with the turbo preset.
    Every file is written into a temporary folder beside `out` and moved in at the end: a failure leaves none of
    them. Returns the written paths."""
    out = Path(out)
    loras = ()
    if preset == "turbo":
        if bundle is not None:
            raise RefAlignInputError("--preset turbo: the shipped student belongs to the embedded model; give no "
                                     "--bundle (or generate with your bundle, --lora and --preset turbo)")
        if not SHIPPED_TURBO.is_file():
            raise RefAlignInputError(f"the embedded turbo student is missing: {SHIPPED_TURBO} does not exist "
                                     "(reinstall the package, or rebuild it with train/make_toy_turbo.py)")
        loras = (LoraSpec(str(SHIPPED_TURBO), 1.0),)
    pipe = RefAlignPipeline.from_bundle(bundle or embedded_bundle(), loras=loras)
    references = demo_references()
    settings = with_preset(pipe.settings, preset)
    result = pipe(DEMO_PROMPT, references, negative_prompt="", settings=settings.replace(seed=seed),
                  callback=progress)
    text, summary, sheet = score_demo(pipe, references, result.frames)
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".demo-", dir=out))
    try:
        staged = {
            "mp4": write_video(result.frames, staging / "demo.mp4", fps=pipe.fps),
            "webp": write_video(result.frames, staging / "demo.webp", fps=pipe.fps),
            "identity_json": staging / "identity.json",
            "identity_report": staging / "identity.txt",
            "contact_sheet": staging / "contact_sheet.png",
            "frame_strip": staging / "frames.png",
        }
        staged["identity_json"].write_text(json.dumps(summary, indent=1))
        staged["identity_report"].write_text(text + "\n")
        sheet.save(staged["contact_sheet"])
        frame_strip(references, result.frames).save(staged["frame_strip"])
        paths = {}
        for name, path in staged.items():
            paths[name] = out / path.name
            os.replace(path, paths[name])
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return paths
