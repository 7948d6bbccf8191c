"""The world judge: scores a video of a toy-world case against the truth, lane by lane.

The world puts subject k in the k-th horizontal lane from the top (`world.plan_tracks`), so the judge knows where
each subject must be. Per frame and lane it finds the subject along the lane (pixels that differ from the grey
background; too few of them = the lane is empty), cuts a square around it and classifies its attributes with
a small CNN trained on the world's own rendered frames of every identity (never on generated video or reference
images), with blur, noise and colour jitter so that a soft decoded frame is judged like a crisp one.

Attributes: shape, pattern and the colour set (the body colour and, with a pattern, its accent: unordered, since a
striped or checkered sprite is half one, half the other). Per subject it reports:
  * `accuracy` — the fraction of frames in which its lane shows the right subject (every attribute right);
  * `attributes` — the fraction of frames in which each attribute is right;
  * `confusion` — the fraction of frames in which its lane shows another reference's attribute in place of its
    own (a wrong shape or pattern that equals another subject's, or a colour that only another subject has);
  * `present` — the fraction of frames in which anything is drawn in its lane.

`calibrate` runs the judge on other world clips (other seeds) of the held-out identities that the ablation scores
(the judge's own ceiling: accuracy should be ~1, confusion ~0); with a `vae` it judges those clips after an encode
and decode (`through_vae`): the most a perfect DiT could score with that VAE. The weights ship as `models/judge.safetensors`, built by
`train_judge` in the toy recipe."""

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..models.safetensors_io import read_safetensors, write_safetensors
from ..models.vae import decode_latents, encode_video
from .world import (BACKGROUND, COLOURS, FRAMES, PATTERNS, SHAPES, SIZE, SUBJECT_SIZES, Subject, all_subjects,
                    render_clip, sample_case)

JUDGE_FILE = Path(__file__).resolve().parent / "models" / "judge.safetensors"
CROP = 32  # pixels: each lane's subject is cut out as a square and resized to CROP×CROP
COLOUR_NAMES = tuple(COLOURS)
HEADS = {"shape": len(SHAPES), "pattern": len(PATTERNS), "colours": len(COLOURS)}  # colours: multi-label
PRESENT_FRACTION = 0.15  # a lane is empty when fewer of its sprite-area pixels than this differ from the background
FOREGROUND_DISTANCE = 0.12  # RGB distance (0..√3) from the background above which a pixel belongs to a subject


class JudgeNet(nn.Module):
    """`[B, 3, CROP, CROP]` in [0, 1] -> logits per attribute."""

    def __init__(self, width: int = 32):
        super().__init__()
        layers, cin = [], 3
        for cout, stride in ((width, 2), (2 * width, 2), (3 * width, 2)):
            layers += [nn.Conv2d(cin, cout, 3, stride, 1), nn.BatchNorm2d(cout), nn.SiLU()]
            cin = cout
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.heads = nn.ModuleDict({name: nn.Linear(cin, size) for name, size in HEADS.items()})

    def forward(self, crops: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.features(crops * 2 - 1)
        return {name: head(h) for name, head in self.heads.items()}


def lane_rows(count: int, size: int = SIZE) -> list[tuple[int, int]]:
    """`[top, bottom)` pixel rows of each lane's sprite band, for `count` subjects (as `world.plan_tracks` lays
    them out)."""
    lane, extent = size / count, SUBJECT_SIZES[min(count, 3)]
    return [(int(round(lane * i + (lane - extent) / 2)), int(round(lane * i + (lane + extent) / 2)))
            for i in range(count)]


def lane_crops(video: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """video `[F, H, W, 3]` in [0, 1] (H = W = the world's size) -> (crops `[F, count, 3, CROP, CROP]`, present
    `[F, count]` bool). Each crop is the lane's band, centred along the lane on its foreground pixels."""
    frames, height, width, _ = video.shape
    if (height, width) != (SIZE, SIZE):
        video = F.interpolate(video.permute(0, 3, 1, 2), size=(SIZE, SIZE), mode="bilinear", align_corners=False,
                              antialias=True).permute(0, 2, 3, 1)
    video = video.float().clamp(0, 1)
    background = torch.tensor(BACKGROUND, dtype=torch.float32) / 255
    foreground = (video - background).norm(dim=-1) > FOREGROUND_DISTANCE  # [F, S, S]
    crops = torch.empty(frames, count, 3, CROP, CROP)
    present = torch.zeros(frames, count, dtype=torch.bool)
    for lane, (top, bottom) in enumerate(lane_rows(count)):
        extent = bottom - top
        band = foreground[:, top:bottom]  # [F, extent, S]
        columns = band.float().sum(1)  # [F, S]
        present[:, lane] = columns.sum(1) >= PRESENT_FRACTION * extent * extent
        for f in range(frames):
            mass = columns[f]
            centre = float((mass * torch.arange(SIZE)).sum() / mass.sum()) if mass.sum() > 0 else SIZE / 2
            left = int(round(min(max(centre - extent / 2, 0), SIZE - extent)))
            patch = video[f, top:bottom, left:left + extent].permute(2, 0, 1)[None]
            crops[f, lane] = F.interpolate(patch, size=(CROP, CROP), mode="bilinear", align_corners=False,
                                           antialias=True)[0]
    return crops, present


@dataclass
class SubjectVerdict:
    name: str
    lane: int
    accuracy: float  # fraction of frames with the right subject in its lane
    confusion: float  # fraction of frames whose lane shows another reference's attribute in place of its own
    present: float  # fraction of frames with anything drawn in its lane
    attributes: dict[str, float] = field(default_factory=dict)  # per attribute, fraction of frames right


@dataclass
class Verdict:
    subjects: list[SubjectVerdict]

    @property
    def accuracy(self) -> float:
        return float(np.mean([s.accuracy for s in self.subjects]))

    @property
    def confusion(self) -> float:
        return float(np.mean([s.confusion for s in self.subjects]))

    def to_dict(self) -> dict:
        return {"accuracy": self.accuracy, "confusion": self.confusion,
                "subjects": [asdict(s) for s in self.subjects]}

    def summary(self) -> str:
        return "world judge (fraction of frames with the right subject in its lane):\n" + "\n".join(
            f"  lane {s.lane} {s.name}: {s.accuracy:.0%} right, {s.confusion:.0%} confused ("
            + ", ".join(f"{k} {v:.0%}" for k, v in s.attributes.items()) + ")" for s in self.subjects)


def subject_labels(subject: Subject) -> tuple[int, int, torch.Tensor]:
    """(shape index, pattern index, colours `[8]` multi-hot: the body colour and, with a pattern, the accent)."""
    colours = torch.zeros(len(COLOURS))
    colours[COLOUR_NAMES.index(subject.colour)] = 1
    colours[COLOUR_NAMES.index(subject.accent)] = 1
    return SHAPES.index(subject.shape), PATTERNS.index(subject.pattern), colours


class WorldJudge:
    """`judge(video, subjects)` -> `Verdict`; `subjects` in lane order (= reference order)."""

    def __init__(self, net: JudgeNet):
        self.net = net.eval().requires_grad_(False)

    @classmethod
    def load(cls, path: str | Path = JUDGE_FILE) -> "WorldJudge":
        tensors, metadata = read_safetensors(path, "world judge")
        net = JudgeNet(**json.loads(metadata.get("config", "{}")))
        net.load_state_dict(tensors)
        return cls(net)

    @torch.no_grad()
    def predict(self, video: torch.Tensor, count: int) -> dict[str, np.ndarray]:
        """-> {"shape", "pattern": indices `[F, count]`, "colours": bool `[F, count, 8]`, "present": bool
        `[F, count]`}. The colour set is every colour the head gives over 1/2, or its most likely one."""
        crops, present = lane_crops(video, count)
        logits = self.net(crops.flatten(0, 1))
        probabilities = logits["colours"].sigmoid()
        colours = probabilities > 0.5
        colours[torch.arange(len(colours)), probabilities.argmax(1)] = True
        return {"shape": logits["shape"].argmax(1).view(-1, count).numpy(),
                "pattern": logits["pattern"].argmax(1).view(-1, count).numpy(),
                "colours": colours.view(-1, count, len(COLOURS)).numpy(), "present": present.numpy()}

    def __call__(self, video: torch.Tensor, subjects: list[Subject], names: list[str] | None = None) -> Verdict:
        if video.ndim != 4 or video.shape[-1] != 3:
            raise ValueError(f"video must be [F, H, W, 3] in [0, 1], got {tuple(video.shape)}")
        if not 1 <= len(subjects) <= 3:
            raise ValueError(f"the toy world has 1–3 subjects per clip, got {len(subjects)}")
        predicted = self.predict(video, len(subjects))
        labels = [subject_labels(s) for s in subjects]
        verdicts = []
        for lane, (shape, pattern, colours) in enumerate(labels):
            present = predicted["present"][:, lane]
            own = colours.numpy().astype(bool)
            got = {"shape": predicted["shape"][:, lane], "pattern": predicted["pattern"][:, lane],
                   "colours": predicted["colours"][:, lane]}
            right = {"shape": (got["shape"] == shape) & present, "pattern": (got["pattern"] == pattern) & present,
                     "colours": (got["colours"] == own).all(1) & present}
            others = [labels[k] for k in range(len(labels)) if k != lane]
            leaked = np.zeros(len(present), dtype=bool)
            for other_shape, other_pattern, other_colours in others:
                foreign = other_colours.numpy().astype(bool) & ~own  # colours only the other subject has
                leaked |= ~right["shape"] & (got["shape"] == other_shape)
                leaked |= ~right["pattern"] & (got["pattern"] == other_pattern)
                leaked |= (got["colours"] & foreign).any(1)
            everything = right["shape"] & right["pattern"] & right["colours"]
            verdicts.append(SubjectVerdict(
                name=names[lane] if names else subjects[lane].id, lane=lane, accuracy=float(everything.mean()),
                confusion=float((leaked & present).mean()), present=float(present.mean()),
                attributes={a: float(r.mean()) for a, r in right.items()}))
        return Verdict(verdicts)


def _gaussian_blur(frames: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """frames `[N, 3, H, W]`, per-frame sigma `[N]` (pixels; 0 = unchanged)."""
    radius = 4
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-x[None] ** 2 / (2 * sigma.clamp(min=1e-3)[:, None] ** 2))
    kernel = kernel / kernel.sum(1, keepdim=True)  # [N, 2r+1]
    n, c, h, w = frames.shape
    padded = F.pad(frames, (radius,) * 4, mode="replicate").reshape(1, n * c, h + 2 * radius, w + 2 * radius)
    k = kernel.repeat_interleave(c, 0)
    out = F.conv2d(padded, k[:, None, None, :], groups=n * c)
    out = F.conv2d(out, k[:, None, :, None], groups=n * c)
    return out.reshape(n, c, h, w)


def render_world_clips(count: int, seed: int, pool: list[Subject],
                           frames: int = FRAMES) -> tuple[torch.Tensor, list[list[Subject]]]:
    """`count` world clips of subjects from `pool` -> (frames `[count, frames, S, S, 3]`, the subjects of each clip
    in lane order)."""
    rng = np.random.default_rng(seed)
    clips, cases = [], []
    for _ in range(count):
        tracks = sample_case(pool, rng)
        clips.append(render_clip(tracks, BACKGROUND, frames, SIZE))
        cases.append([t.subject for t in tracks])
    return torch.stack(clips), cases


def degrade(frames: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """What a decoder does to a frame: blur (σ 0–2.5 px), a brightness / contrast / per-channel shift, noise.
    frames `[N, H, W, 3]` in [0, 1]."""
    n = frames.shape[0]
    x = frames.permute(0, 3, 1, 2)
    x = _gaussian_blur(x, torch.rand(n, generator=generator) * 2.5)
    gain = 1 + (torch.rand(n, 1, 1, 1, generator=generator) - 0.5) * 0.3
    shift = (torch.rand(n, 3, 1, 1, generator=generator) - 0.5) * 0.12
    x = (x - 0.5) * gain + 0.5 + shift
    x = x + torch.randn(x.shape, generator=generator) * torch.rand(n, 1, 1, 1, generator=generator) * 0.05
    return x.clamp(0, 1).permute(0, 2, 3, 1)


def train_judge(clips: int = 1200, steps: int = 2500, batch: int = 128, seed: int = 0, log=print) -> JudgeNet:
    """Train the judge's CNN on degraded lane crops of world clips of every identity (the judge is the world's
    ground truth: it must know the held-out subjects it scores; `calibrate` uses other clips of them)."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    training, held_out = all_subjects()
    videos, cases = render_world_clips(clips, seed, pool=training + held_out)
    crops, shapes, patterns, colours = [], [], [], []
    for video, subjects in zip(videos, cases):
        lane_images, _ = lane_crops(degrade(video, generator), len(subjects))
        crops.append(lane_images.flatten(0, 1))  # frame-major: lane index runs fastest
        for shape, pattern, colour in [subject_labels(s) for s in subjects] * video.shape[0]:
            shapes.append(shape), patterns.append(pattern), colours.append(colour)
    x = torch.cat(crops)
    shapes, patterns, colours = torch.tensor(shapes), torch.tensor(patterns), torch.stack(colours)
    net = JudgeNet()
    optimizer = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 2e-3, total_steps=steps)
    net.train()
    for step in range(steps):
        pick = torch.randint(0, len(x), (batch,), generator=generator)
        logits = net(x[pick])
        loss = F.cross_entropy(logits["shape"], shapes[pick]) + F.cross_entropy(logits["pattern"], patterns[pick]) \
            + F.binary_cross_entropy_with_logits(logits["colours"], colours[pick], reduction="sum") / batch
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 250 == 0 or step == steps - 1:
            log(f"judge step {step}: loss {loss.item():.4f}")
    return net.eval()


def save_judge(net: JudgeNet, path: str | Path) -> Path:
    config = {"width": net.features[0].out_channels}
    write_safetensors({k: v.contiguous() for k, v in net.state_dict().items()}, path, {"config": json.dumps(config)})
    return Path(path)


@torch.no_grad()
def through_vae(vae: nn.Module, video: torch.Tensor) -> torch.Tensor:
    """A clip `[F, H, W, 3]` in [0, 1] encoded and decoded by `vae` (the best a DiT that predicts perfect latents
    could give back)."""
    latents = encode_video(vae, video.permute(3, 0, 1, 2)[None] * 2 - 1)
    return decode_latents(vae, latents)[0].permute(1, 2, 3, 0).add(1).div(2).to(video)


def calibrate(judge: WorldJudge, clips: int = 96, seed: int = 1, vae: nn.Module | None = None) -> dict:
    """The judge on the world's own clips of held-out identities: per-lane accuracy and confusion (the ceiling
    every generated video is measured against); with `vae`, on those clips after `through_vae`."""
    videos, cases = render_world_clips(clips, seed + 10_000, pool=all_subjects()[1])
    if vae is not None:
        videos = [through_vae(vae, video) for video in videos]
    verdicts = [judge(video, subjects) for video, subjects in zip(videos, cases)]
    lanes = [s for v in verdicts for s in v.subjects]
    return {"clips": clips, "lanes": len(lanes), "accuracy": float(np.mean([s.accuracy for s in lanes])),
            "confusion": float(np.mean([s.confusion for s in lanes])),
            "attributes": {a: float(np.mean([s.attributes[a] for s in lanes])) for a in HEADS}}
