"""Training data: the JSONL manifest, video decoding and frame sampling, and reference augmentation.

Manifest (one JSON object per line, paths relative to the manifest's folder):

    {"video": "videos/0001.mp4", "caption": "a red disc rolls past a blue box",
     "references": [{"image": "refs/0001_0.png", "mask": "refs/0001_0_mask.png", "subject": "red_disc"}, ...]}

`mask` is optional (white = subject; the background is turned white and the image cropped to the mask, as in
training); `subject` names the identity (used by evaluation and for bookkeeping). `toy_world.py` writes this format."""

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import av
import kornia
import kornia.augmentation as K
import numpy as np
import torch

from .errors import RefAlignInputError

logger = logging.getLogger(__name__)


@dataclass
class ReferenceEntry:
    image: Path
    mask: Path | None = None
    subject: str | None = None


@dataclass
class ManifestEntry:
    video: Path
    caption: str
    references: list[ReferenceEntry]
    line: int = 0


@dataclass
class SkipCounter:
    """Counts what was skipped and why, so a long run reports it instead of crashing."""

    reasons: dict[str, int] = field(default_factory=dict)

    def skip(self, what: str, error: Exception) -> None:
        kind = type(error).__name__
        self.reasons[kind] = self.reasons.get(kind, 0) + 1
        logger.warning("skipping %s: %s", what, error)

    @property
    def total(self) -> int:
        return sum(self.reasons.values())


def read_manifest(path: str | os.PathLike, skipped: SkipCounter | None = None) -> list[ManifestEntry]:
    path = Path(path)
    if not path.is_file():
        raise RefAlignInputError(f"dataset manifest {path} does not exist")
    skipped = skipped if skipped is not None else SkipCounter()
    entries = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
            refs = [ReferenceEntry(path.parent / r["image"], path.parent / r["mask"] if r.get("mask") else None,
                                   r.get("subject")) for r in raw["references"]]
            if not refs:
                raise ValueError("no references")
            entries.append(ManifestEntry(path.parent / raw["video"], str(raw.get("caption", "")), refs, number))
        except (ValueError, KeyError, TypeError) as e:
            skipped.skip(f"{path}:{number}", e)
    return entries


def load_video_clip(path: str | os.PathLike, num_frames: int, fps: float | None, height: int, width: int,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """Decode a video, resample it to `fps` (None: keep the native rate), take a random window of `num_frames`,
    resize the short side and centre-crop to height×width -> `[3, num_frames, height, width]` in [-1, 1]."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        native = float(stream.average_rate or 16)
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    if not frames:
        raise RefAlignInputError(f"video {path} has no frames")
    step = native / fps if fps else 1.0
    available = int(math.floor((len(frames) - 1) / step)) + 1
    if available < num_frames:
        raise RefAlignInputError(f"video {path} gives {available} frames at {fps or native} fps, {num_frames} needed")
    start = int(torch.randint(0, available - num_frames + 1, (1,), generator=generator)) if generator else 0
    picked = [frames[min(len(frames) - 1, round((start + i) * step))] for i in range(num_frames)]
    video = torch.from_numpy(np.stack(picked)).permute(0, 3, 1, 2).float() / 255.0  # [F, 3, H, W]
    scale = max(height / video.shape[2], width / video.shape[3])
    size = (max(height, round(video.shape[2] * scale)), max(width, round(video.shape[3] * scale)))
    video = kornia.geometry.transform.resize(video, size, interpolation="bilinear", antialias=True)
    video = kornia.geometry.transform.center_crop(video, (height, width))
    return video.clamp(0, 1).mul(2).sub(1).permute(1, 0, 2, 3).contiguous()


class ReferenceAugmentation(torch.nn.Module):
    """The release's reference augmentation with white fill: hflip p=0.5; affine rotate ±45°, shear ±10°, scale
    0.9–1.1, translate ±5 %; Gaussian blur; additive colour jitter ±0.05; brightness ×U(0.9, 1.1); perspective
    p=0.5, distortion 0.3. Input and output `[B, 3, H, W]` in [0, 1]."""

    def __init__(self):
        super().__init__()
        # geometric ops run on (1 − image) with zero padding, so the uncovered area comes out white
        self.geometric = K.AugmentationSequential(
            K.RandomHorizontalFlip(p=0.5),
            K.RandomAffine(degrees=45.0, translate=(0.05, 0.05), scale=(0.9, 1.1), shear=(-10.0, 10.0, -10.0, 10.0),
                           p=1.0),
            K.RandomPerspective(distortion_scale=0.3, p=0.5),
        )

    def forward(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            out = 1 - self.geometric(1 - images)
        b = images.shape[0]
        sigma = torch.rand(b, generator=generator) * 1.5 + 0.1
        kernel = max(3, (min(images.shape[-2:]) // 50) | 1)
        out = torch.stack([kornia.filters.gaussian_blur2d(o[None], (kernel, kernel), (float(s), float(s)))[0]
                           for o, s in zip(out, sigma)])
        jitter = (torch.rand(b, 3, 1, 1, generator=generator) - 0.5) * 0.1
        brightness = torch.rand(b, 1, 1, 1, generator=generator) * 0.2 + 0.9
        return ((out + jitter) * brightness).clamp(0, 1)
