"""A deterministic synthetic multi-subject world for training and evaluating reference-to-video at toy scale.

A subject's identity is (shape, body colour, pattern, pattern colour). A clip (default 5 frames, 128×128, 8 fps)
shows 1–3 subjects over a plain grey background, one per horizontal lane from the top in reference order, each
gliding left or right. The caption names each subject's shape and direction in the same order ("a disc moves right
and a star moves left"): colour and pattern come from the references alone, as a reference-to-video model must take
them. The layout follows from the caption and the references, so a small model can learn it on a CPU; what it has
to learn is the subjects. Per subject there is a reference on white in another angle and scale, with its mask.
Identities are split into training and held-out ones; every held-out identity is a new combination of attributes
seen in training. Output is the training manifest format (`refalign_core/training/datasets.py`, jsonl)."""

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..files import write_atomic
from ..inference.video_io import write_video

SHAPES = ("disc", "square", "triangle", "diamond", "star", "cross", "hexagon")
COLOURS = {"red": (215, 45, 45), "orange": (240, 140, 30), "yellow": (235, 205, 40), "green": (45, 160, 70),
           "teal": (30, 160, 160), "blue": (45, 80, 215), "purple": (140, 60, 190), "pink": (235, 120, 170)}
PATTERNS = ("plain", "striped", "dotted", "checkered", "ringed")
MOTIONS = {1: "moves right", -1: "moves left"}
BACKGROUND = (96, 100, 112)
SUBJECT_SIZES = {1: 60, 2: 50, 3: 38}  # pixels, by the number of subjects
DISTANCE = 0.375  # of the frame, over the clip
SIZE, FRAMES, FPS = 128, 5, 8
HELD_OUT = 24


@dataclass(frozen=True)
class Subject:
    shape: str
    colour: str
    pattern: str
    accent: str

    @property
    def id(self) -> str:
        return f"{self.colour}_{self.pattern}_{self.shape}"


@dataclass(frozen=True)
class Track:
    """One subject in a clip: its direction (+1 right, -1 left), sprite size, start position and the distance it
    glides over the clip (pixels)."""

    subject: Subject
    direction: int
    size: int
    start: tuple[float, float]
    distance: float

    def position(self, frame: int, frames: int) -> tuple[float, float]:
        return self.start[0] + self.direction * self.distance * frame / max(1, frames - 1), self.start[1]

    @property
    def phrase(self) -> str:
        return f"a {self.subject.shape} {MOTIONS[self.direction]}"


def all_subjects(seed: int = 0, held_out: int = HELD_OUT) -> tuple[list[Subject], list[Subject]]:
    """(training, held-out) identities: every shape × colour × pattern, accents fixed per identity; held-out ones are
    a seeded sample, so no held-out identity is ever seen in training."""
    rng = np.random.default_rng(seed)
    colours = list(COLOURS)
    subjects = []
    for shape in SHAPES:
        for colour in colours:
            for pattern in PATTERNS:
                # never the body colour itself, or the pattern would not show
                accent = colours[(colours.index(colour) + 1 + SHAPES.index(shape)) % len(colours)]
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
    if subject.shape == "disc":
        draw.ellipse((1, 1, size - 2, size - 2), fill=255)
    elif subject.shape == "square":
        draw.rectangle((3, 3, size - 4, size - 4), fill=255)
    else:
        draw.polygon(_polygon(subject.shape, size), fill=255)
    body = Image.new("RGB", (size, size), COLOURS[subject.colour])
    pen = ImageDraw.Draw(body)
    accent = COLOURS[subject.accent]
    step = max(8, size // 3)  # coarse: a pattern period of two or more DiT tokens
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
        for r in range(size // 2, 0, -step // 2):
            fill = accent if (r // (step // 2)) % 2 else COLOURS[subject.colour]
            pen.ellipse((size / 2 - r, size / 2 - r, size / 2 + r, size / 2 + r), fill=fill)
    sprite = body.convert("RGBA")
    sprite.putalpha(mask)
    return sprite


def reference_image(subject: Subject, rng: np.random.Generator, size: int = SIZE) -> tuple[Image.Image, Image.Image]:
    """The subject on white in its own angle and scale, and its mask."""
    sprite = render_subject(subject, int(size * rng.uniform(0.42, 0.62)))
    sprite = sprite.rotate(float(rng.uniform(-10, 10)), resample=Image.BILINEAR, expand=True)
    image = Image.new("RGB", (size, size), (255, 255, 255))
    mask = Image.new("L", (size, size), 0)
    x, y = (size - sprite.width) // 2, (size - sprite.height) // 2
    image.paste(sprite, (x, y), sprite)
    mask.paste(sprite.getchannel("A"), (x, y))
    return image, mask


def plan_tracks(subjects: list[Subject], directions: list[int], size: int = SIZE) -> list[Track]:
    """Subject k in the k-th horizontal lane from the top, centred in it, gliding `DISTANCE` of the frame left (-1)
    or right (+1) from near its edge."""
    lane = size / len(subjects)
    extent = SUBJECT_SIZES[min(len(subjects), 3)]
    distance = DISTANCE * size
    tracks = []
    for i, (subject, sign) in enumerate(zip(subjects, directions)):
        along = (size - extent - distance) / 2 + (0 if sign > 0 else distance)
        tracks.append(Track(subject, sign, extent, (along, lane * i + (lane - extent) / 2), distance))
    return tracks


def render_clip(tracks: list[Track], background: tuple[int, int, int] = BACKGROUND, frames: int = FRAMES,
                size: int = SIZE) -> torch.Tensor:
    """`[frames, size, size, 3]` in [0, 1]."""
    base = Image.new("RGB", (size, size), background)
    sprites = [render_subject(t.subject, t.size) for t in tracks]
    video = []
    for f in range(frames):
        frame = base.copy()
        for track, sprite in zip(tracks, sprites):
            x, y = track.position(f, frames)
            frame.paste(sprite, (int(round(x)), int(round(y))), sprite)
        video.append(torch.from_numpy(np.array(frame)).float() / 255.0)
    return torch.stack(video)


def caption(tracks: list[Track]) -> str:
    return " and ".join(t.phrase for t in tracks)


def sample_case(pool: list[Subject], rng: np.random.Generator, min_subjects: int = 1, max_subjects: int = 3
                ) -> list[Track]:
    """Subjects of distinct shapes (the caption names them by shape) and their tracks."""
    count = int(rng.integers(min_subjects, max_subjects + 1))
    picks: list[Subject] = []
    for i in rng.permutation(len(pool)):
        if pool[int(i)].shape not in {s.shape for s in picks}:
            picks.append(pool[int(i)])
        if len(picks) == count:
            break
    return plan_tracks(picks, [int(rng.choice([-1, 1])) for _ in picks])


def make_toy_world(folder: str | os.PathLike, num_videos: int = 64, split: str = "train", frames: int = FRAMES,
                   size: int = SIZE, seed: int = 0, max_subjects: int = 3, min_subjects: int = 1) -> Path:
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
        tracks = sample_case(pool, rng, min_subjects, max_subjects)
        # lossless: x264's lossy output varies from run to run here, lossless decodes to the same frames
        write_video(render_clip(tracks, BACKGROUND, frames, size), folder / "videos" / f"{v:05d}.mp4", fps=FPS,
                    crf=0)
        refs = []
        for k, track in enumerate(tracks):
            image, mask = reference_image(track.subject, rng, size)
            image.save(folder / "refs" / f"{v:05d}_{k}.png")
            mask.save(folder / "refs" / f"{v:05d}_{k}_mask.png")
            refs.append({"image": f"refs/{v:05d}_{k}.png", "mask": f"refs/{v:05d}_{k}_mask.png",
                         "subject": track.subject.id})
        lines.append(json.dumps({"video": f"videos/{v:05d}.mp4", "caption": caption(tracks), "references": refs}))
    return write_atomic(folder / "manifest.jsonl", "\n".join(lines) + "\n")  # written last: marks the world done


def vocabulary() -> list[str]:
    """Every word a toy-world caption can use."""
    words = {"a", "and"} | set(SHAPES)
    for motion in MOTIONS.values():
        words |= set(motion.split())
    return sorted(words)
