"""A deterministic synthetic multi-subject world for training and evaluating at toy scale.

A subject's identity is (shape, body colour, pattern, pattern colour). Videos (default 17 frames, 64×64) show 1–3
subjects moving, rotating and scaling over varied backgrounds; each comes with a caption and, per subject, a
reference on white in another pose and scale (with its mask) and the subject id. Subjects are split into training
and held-out identities. Output is the training manifest format (`data.py`)."""

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from .video_io import write_video

SHAPES = ("disc", "square", "triangle", "diamond", "star", "cross", "hexagon")
COLOURS = {"red": (215, 45, 45), "orange": (240, 140, 30), "yellow": (235, 205, 40), "green": (45, 160, 70),
           "teal": (30, 160, 160), "blue": (45, 80, 215), "purple": (140, 60, 190), "pink": (235, 120, 170)}
PATTERNS = ("plain", "striped", "dotted", "checkered", "ringed")
MOTIONS = {(1, 0): "moves right", (-1, 0): "moves left", (0, 1): "moves down", (0, -1): "moves up"}


@dataclass(frozen=True)
class Subject:
    shape: str
    colour: str
    pattern: str
    accent: str

    @property
    def id(self) -> str:
        return f"{self.colour}_{self.pattern}_{self.shape}"

    @property
    def phrase(self) -> str:
        return f"a {self.colour} {self.pattern} {self.shape}"


def all_subjects(seed: int = 0, held_out: int = 16) -> tuple[list[Subject], list[Subject]]:
    """(training, held-out) identities: every shape × colour × pattern, accents fixed per identity; held-out ones are
    a seeded sample, so no held-out identity is ever seen in training."""
    rng = np.random.default_rng(seed)
    colours = list(COLOURS)
    subjects = []
    for shape in SHAPES:
        for colour in colours:
            for pattern in PATTERNS:
                accent = colours[(colours.index(colour) + 3 + SHAPES.index(shape)) % len(colours)]
                subjects.append(Subject(shape, colour, pattern, accent if pattern != "plain" else colour))
    order = rng.permutation(len(subjects))
    held = {int(i) for i in order[:held_out]}
    return [s for i, s in enumerate(subjects) if i not in held], [s for i, s in enumerate(subjects) if i in held]


def _polygon(shape: str, size: int) -> list[tuple[float, float]] | None:
    c, r = size / 2, size / 2 - 1
    if shape == "triangle":
        return [(c, 1), (size - 1, size - 2), (1, size - 2)]
    if shape == "diamond":
        return [(c, 1), (size - 1, c), (c, size - 1), (1, c)]
    if shape == "hexagon":
        return [(c + r * np.cos(a), c + r * np.sin(a)) for a in np.linspace(0, 2 * np.pi, 7)[:-1]]
    if shape == "star":
        return [(c + (r if k % 2 == 0 else r * 0.45) * np.cos(a - np.pi / 2),
                 c + (r if k % 2 == 0 else r * 0.45) * np.sin(a - np.pi / 2))
                for k, a in enumerate(np.linspace(0, 2 * np.pi, 11)[:-1])]
    if shape == "cross":
        a, b = size * 0.32, size * 0.68
        return [(a, 1), (b, 1), (b, a), (size - 1, a), (size - 1, b), (b, b), (b, size - 1), (a, size - 1), (a, b),
                (1, b), (1, a), (a, a)]
    return None


def render_subject(subject: Subject, size: int = 48) -> Image.Image:
    """The subject as an RGBA sprite (transparent outside its shape)."""
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    polygon = _polygon(subject.shape, size)
    if subject.shape == "disc":
        draw.ellipse((1, 1, size - 2, size - 2), fill=255)
    elif subject.shape == "square":
        draw.rectangle((3, 3, size - 4, size - 4), fill=255)
    else:
        draw.polygon(polygon, fill=255)
    body = Image.new("RGB", (size, size), COLOURS[subject.colour])
    pen = ImageDraw.Draw(body)
    accent = COLOURS[subject.accent]
    step = max(6, size // 4)  # coarse enough to survive the 8× latent grid
    if subject.pattern == "striped":
        for x in range(0, size, step):
            pen.rectangle((x, 0, x + step // 2 - 1, size), fill=accent)
    elif subject.pattern == "dotted":
        for y in range(step // 2, size, step):
            for x in range(step // 2, size, step):
                pen.ellipse((x - step // 3, y - step // 3, x + step // 3, y + step // 3), fill=accent)
    elif subject.pattern == "checkered":
        for y in range(0, size, step):
            for x in range(0, size, step):
                if (x // step + y // step) % 2:
                    pen.rectangle((x, y, x + step - 1, y + step - 1), fill=accent)
    elif subject.pattern == "ringed":
        for r in range(size // 2, 0, -step):
            if (r // step) % 2:
                pen.ellipse((size / 2 - r, size / 2 - r, size / 2 + r, size / 2 + r), fill=accent)
            else:
                pen.ellipse((size / 2 - r, size / 2 - r, size / 2 + r, size / 2 + r), fill=COLOURS[subject.colour])
    sprite = body.convert("RGBA")
    sprite.putalpha(mask)
    return sprite


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    a, b = rng.integers(60, 200, 3), rng.integers(60, 200, 3)
    t = np.linspace(0, 1, size)[:, None, None] if rng.random() < 0.5 else np.linspace(0, 1, size)[None, :, None]
    grad = (a * (1 - t) + b * t) * np.ones((size, size, 1))
    noise = rng.normal(0, 6, (size, size, 1))
    return Image.fromarray(np.clip(grad + noise, 0, 255).astype(np.uint8))


def reference_image(subject: Subject, rng: np.random.Generator, size: int = 64) -> tuple[Image.Image, Image.Image]:
    """The subject on white in its own pose and scale, and its mask."""
    sprite = render_subject(subject, int(size * rng.uniform(0.6, 0.9)))
    sprite = sprite.rotate(float(rng.uniform(-40, 40)), resample=Image.BILINEAR, expand=True)
    image = Image.new("RGB", (size, size), (255, 255, 255))
    mask = Image.new("L", (size, size), 0)
    x, y = (size - sprite.width) // 2, (size - sprite.height) // 2
    image.paste(sprite, (x, y), sprite)
    mask.paste(sprite.getchannel("A"), (x, y))
    return image, mask


def render_video(subjects: list[Subject], rng: np.random.Generator, frames: int = 17, size: int = 64
                 ) -> tuple[torch.Tensor, str]:
    """`[frames, size, size, 3]` in [0, 1] and its caption."""
    background = _background(rng, size)
    tracks, phrases = [], []
    for subject in subjects:
        direction = list(MOTIONS)[int(rng.integers(len(MOTIONS)))]
        speed = rng.uniform(0.8, 1.6)
        extent = rng.uniform(0.32, 0.5) * size
        start = rng.uniform(0.1 * size, 0.9 * size - extent, 2) - np.array(direction) * speed * frames / 2
        spin = rng.choice([-1, 1]) * rng.uniform(2, 8)
        grow = rng.uniform(-0.2, 0.2)
        tracks.append((subject, np.array(direction) * speed, start, extent, spin, grow))
        words = MOTIONS[direction] + (" and turns" if abs(spin) > 5 else "")
        phrases.append(f"{subject.phrase} {words}")
    video = []
    for f in range(frames):
        frame = background.copy()
        for subject, velocity, start, extent, spin, grow in tracks:
            s = max(8, int(extent * (1 + grow * f / frames)))
            sprite = render_subject(subject, s).rotate(spin * f, resample=Image.BILINEAR, expand=True)
            x, y = (start + velocity * f).clip(-s / 3, size - 2 * s / 3).astype(int)
            frame.paste(sprite, (int(x), int(y)), sprite)
        video.append(torch.from_numpy(np.array(frame)).float() / 255.0)
    return torch.stack(video), " and ".join(phrases)


def make_toy_world(folder: str | os.PathLike, num_videos: int = 64, split: str = "train", frames: int = 17,
                   size: int = 64, seed: int = 0, max_subjects: int = 3, min_subjects: int = 1) -> Path:
    """Write `num_videos` clips with subjects from `split` ("train" or "held_out") plus references, masks and
    `manifest.jsonl` (deterministic for a seed). Returns the manifest path."""
    folder = Path(folder)
    (folder / "videos").mkdir(parents=True, exist_ok=True)
    (folder / "refs").mkdir(exist_ok=True)
    train, held_out = all_subjects()
    pool = train if split == "train" else held_out
    rng = np.random.default_rng(seed + (0 if split == "train" else 10_000))
    lines = []
    for v in range(num_videos):
        count = int(rng.integers(min_subjects, max_subjects + 1))
        picks = [pool[i] for i in rng.choice(len(pool), count, replace=False)]
        video, caption = render_video(picks, rng, frames, size)
        # lossless: x264's lossy output varies from run to run here, lossless decodes to the same frames
        write_video(video, folder / "videos" / f"{v:05d}.mp4", fps=16, crf=0)
        refs = []
        for k, subject in enumerate(picks):
            image, mask = reference_image(subject, rng, size)
            image.save(folder / "refs" / f"{v:05d}_{k}.png")
            mask.save(folder / "refs" / f"{v:05d}_{k}_mask.png")
            refs.append({"image": f"refs/{v:05d}_{k}.png", "mask": f"refs/{v:05d}_{k}_mask.png", "subject": subject.id})
        lines.append(json.dumps({"video": f"videos/{v:05d}.mp4", "caption": caption, "references": refs}))
    manifest = folder / "manifest.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def vocabulary() -> list[str]:
    """Every word a toy-world caption can use."""
    words = {"a", "and", "turns"} | set(SHAPES) | set(COLOURS) | set(PATTERNS)
    for motion in MOTIONS.values():
        words |= set(motion.split())
    return sorted(words)
