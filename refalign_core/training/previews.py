"""Previews during training: generate the sample prompts with the current weights (the EMA weights when EMA is on)
every `previews.every` steps, save each video and its Identity Check contact sheet, and log the per-subject
identity score, so a creator sees identity improve as the loss falls.

Sample-prompts file (UTF-8): one preview per line, the prompt followed by options; `#` starts a comment line; paths
are relative to the file:

    a red disc moves right --ref refs/disc.png --ref refs/square.png --w 64 --h 64 --f 17 --s 25 --d 0

--ref IMAGE (1–4; a PNG's alpha is its mask), --mask IMAGE (after a --ref: its mask, white = subject), --name NAME
(after a --ref: the subject's name in reports; default the file name), --w / --h (size, multiples of 16), --f
(frames, 4n+1), --s (steps), --d (seed), --g (image scale), --t (text scale), --n (negative prompt, default
empty)."""

import argparse
import csv
import json
import logging
import shlex
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import RefAlignInputError
from ..inference.references import MAX_REFERENCES, Reference, encode_references, prepare_references
from ..inference.sampler import SamplingSettings
from ..inference.video_io import load_image, write_video
from ..models.safetensors_io import read_safetensors, write_safetensors
from ..models.text_encoder import encode_prompts
from .checkpoints import drop_rows_after
from .datasets import read_text

logger = logging.getLogger(__name__)
SCORE_COLUMNS = ["step", "prompt", "subject", "identity"]  # previews/identity.csv


@dataclass
class SamplePrompt:
    prompt: str
    references: list[Reference]
    settings: SamplingSettings
    negative_prompt: str = ""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise RefAlignInputError(message)


def _parser() -> _Parser:
    parser = _Parser(add_help=False, allow_abbrev=False)
    parser.add_argument("prompt", nargs="*")
    parser.add_argument("--ref", action="append", default=[])
    parser.add_argument("--mask", action="append", default=[])
    parser.add_argument("--name", action="append", default=[])
    for flag, kind in (("--w", int), ("--h", int), ("--f", int), ("--s", int), ("--d", int), ("--g", float),
                       ("--t", float)):
        parser.add_argument(flag, type=kind)
    parser.add_argument("--n", default="")
    return parser


def _attached(tokens: list[str], flag: str) -> list[int | None]:
    """For each --ref, the position of the `flag` value that follows it (before the next --ref), or None."""
    out, current = [], None
    for i, token in enumerate(tokens):
        if token == "--ref":
            out.append(None)
            current = len(out) - 1
        elif token == flag:
            if current is None:
                raise RefAlignInputError(f"{flag} must follow a --ref")
            out[current] = sum(1 for t in tokens[:i] if t == flag)
    return out


def read_sample_prompts(path: str | Path, shift: float) -> list[SamplePrompt]:
    """Parse and check the file (every image readable, every value valid) before training starts."""
    path = Path(path)
    if not path.is_file():
        raise RefAlignInputError(f"previews.prompts: {path} does not exist")
    prompts = []
    for number, line in enumerate(read_text(path, "previews.prompts").split("\n"), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        where = f"previews.prompts {path}:{number}"
        try:
            tokens = shlex.split(line)
            args = _parser().parse_args(tokens)
            if not args.prompt:
                raise RefAlignInputError("no prompt before the options")
            if not 1 <= len(args.ref) <= MAX_REFERENCES:
                raise RefAlignInputError(f"needs 1–{MAX_REFERENCES} --ref images, got {len(args.ref)}")
            masks, names = _attached(tokens, "--mask"), _attached(tokens, "--name")
            references = []
            for i, ref in enumerate(args.ref):
                image = load_image(path.parent / ref)
                mask = load_image(path.parent / args.mask[masks[i]]).convert("L") if masks[i] is not None else None
                name = args.name[names[i]] if names[i] is not None else Path(ref).stem
                references.append(Reference(image, mask, name))
            values = {"width": args.w, "height": args.h, "num_frames": args.f, "steps": args.s, "seed": args.d,
                      "image_scale": args.g, "text_scale": args.t}
            settings = SamplingSettings(shift=shift).replace(**{k: v for k, v in values.items() if v is not None})
            prepare_references(references, settings.width, settings.height, MAX_REFERENCES)
        except (RefAlignInputError, ValueError) as e:
            raise RefAlignInputError(f"{where}: {e}") from e
        prompts.append(SamplePrompt(" ".join(args.prompt), references, settings, args.n))
    if not prompts:
        raise RefAlignInputError(f"previews.prompts: {path} holds no prompt")
    return prompts


def encode_preview_inputs(prompts: list[SamplePrompt], encoders, path: Path) -> None:
    """Prompt / negative embeddings and reference latents of every preview, computed once (main process) so the
    text encoder need not stay in memory."""
    tensors = {}
    for i, p in enumerate(prompts):
        embeds = encode_prompts(encoders.text_encoder, [p.prompt, p.negative_prompt])
        fitted = prepare_references(p.references, p.settings.width, p.settings.height, MAX_REFERENCES)
        tensors[f"{i}.prompt"], tensors[f"{i}.negative"] = embeds[0:1], embeds[1:2]
        tensors[f"{i}.references"] = encode_references(encoders.vae, fitted)
    write_safetensors(tensors, path)


class Previews:
    """Runs the previews of one training run; `run(step, dit)` on every process when the model is sharded (its
    forward is collective), else on the main process only. Only the main process decodes, scores and writes."""

    def __init__(self, prompts: list[SamplePrompt], inputs: Path, folder: Path, encoders, main_process: bool):
        self.prompts, self.folder, self.encoders, self.main = prompts, folder, encoders, main_process
        self.inputs = read_safetensors(inputs, "preview inputs")[0]
        self.scores_path = folder / "identity.csv"

    def truncate(self, step: int) -> None:
        """Drop scores logged after `step` (a resumed run logs them again)."""
        if self.main and self.scores_path.is_file():
            drop_rows_after(self.scores_path, step, SCORE_COLUMNS)

    @torch.no_grad()
    def run(self, step: int, dit, autocast=None) -> list[dict]:
        from ..metrics.identity import IdentitySettings
        from ..metrics.identity_sheet import evaluate
        from ..inference.pipeline import DiTDenoiser, VAECodec, generate

        was_training = dit.training
        dit.eval()
        results = []
        try:
            for i, p in enumerate(self.prompts):
                text = (self.inputs[f"{i}.prompt"], self.inputs[f"{i}.negative"])
                with autocast() if autocast is not None else torch.autocast("cpu", enabled=False):
                    latents = generate(DiTDenoiser(dit), None, text, p.settings,
                                       reference_latents=self.inputs[f"{i}.references"]).latents
                if not self.main:
                    continue
                frames = VAECodec(self.encoders.vae).decode(latents)
                out = self.folder / f"step-{step:06d}"
                out.mkdir(parents=True, exist_ok=True)
                write_video(frames, out / f"preview-{i}.mp4", fps=16)
                images = [r.image for r in p.references]
                names = [r.name for r in p.references]
                report, sheet = evaluate(images, frames, self.encoders.vfm, masks=[r.mask for r in p.references],
                                         names=names, settings=IdentitySettings(sample_frames=min(32, len(frames))))
                sheet.save(out / f"preview-{i}-identity.png")
                (out / f"preview-{i}.json").write_text(json.dumps({"prompt": p.prompt, **report.to_dict()}, indent=1))
                scores = {s.name: s.mean for s in report.subjects}
                results.append({"prompt": i, "scores": scores})
                new = not self.scores_path.is_file()
                with self.scores_path.open("a", newline="") as f:
                    writer = csv.writer(f)
                    if new:
                        writer.writerow(SCORE_COLUMNS)
                    for name, score in scores.items():
                        writer.writerow([step, i, name, f"{score:.4f}"])
                logger.info("preview step %d, prompt %d: %s", step, i,
                            ", ".join(f"{n} {s:.3f}" for n, s in scores.items()))
        finally:
            dit.train(was_training)
        return results


def read_identity_log(path: Path) -> dict[str, list[tuple[int, float]]]:
    """identity.csv -> {"prompt i: subject": [(step, score), ...]}."""
    series: dict[str, list[tuple[int, float]]] = {}
    if path.is_file():
        for row in csv.DictReader(path.open()):
            series.setdefault(f"{row['prompt']}: {row['subject']}", []).append((int(row["step"]),
                                                                                float(row["identity"])))
    return series
