"""Training data: video probing and window decoding, reference augmentation, and the skip bookkeeping every
dataset reader and the cache share. The dataset formats are in `datasets.py`."""

import functools
import hashlib
import logging
import math
import os
from dataclasses import dataclass, field

import av
import kornia
import kornia.augmentation as K
import numpy as np
import torch

from ..errors import RefAlignInputError

logger = logging.getLogger(__name__)


@dataclass
class SkipCounter:
    """What was skipped and why, so a long run reports it instead of crashing: counts per error kind plus the
    first `keep` entries with their reasons (for reports)."""

    reasons: dict[str, int] = field(default_factory=dict)
    entries: list[tuple[str, str]] = field(default_factory=list)
    keep: int = 1000

    def skip(self, what: str, error: Exception | str, kind: str | None = None, log: bool = True) -> None:
        kind = kind or (type(error).__name__ if isinstance(error, Exception) else "Skipped")
        self.reasons[kind] = self.reasons.get(kind, 0) + 1
        if len(self.entries) < self.keep:
            self.entries.append((what, str(error)))
        if log:
            logger.warning("skipping %s: %s", what, error)

    @property
    def total(self) -> int:
        return sum(self.reasons.values())


@functools.lru_cache(maxsize=65536)
def file_identity(path: str) -> str:
    """Size and the first and last MiB of a file: stable when a file is copied, different when it is replaced."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(1 << 20)
            f.seek(max(0, size - (1 << 20)))
            tail = f.read(1 << 20)
    except OSError:
        return "missing"
    return hashlib.sha256(str(size).encode() + head + tail).hexdigest()[:16]


@dataclass(frozen=True)
class VideoInfo:
    width: int
    height: int
    fps: float
    frames: int


def probe_video(path: str | os.PathLike) -> VideoInfo:
    """Size, frame rate and frame count from the container (no decoding, except to count frames when the header
    does not say)."""
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise RefAlignInputError(f"video {path} has no video stream")
            stream = container.streams.video[0]
            fps = float(stream.average_rate or stream.guessed_rate or 0) or 16.0
            frames = stream.frames
            if not frames:
                frames = sum(1 for _ in container.decode(stream))
            return VideoInfo(stream.codec_context.width, stream.codec_context.height, fps, frames)
    except (av.FFmpegError, OSError) as e:
        raise RefAlignInputError(f"video {path} cannot be read: {e}") from e


def frames_at(fps: float | None, info: VideoInfo, frame_range: tuple[int, int] | None = None) -> int:
    """How many frames the clip (or its `[start, end)` range) gives when resampled to `fps`."""
    start, end = frame_range or (0, info.frames)
    length = max(0, min(end, info.frames) - start)
    step = info.fps / fps if fps else 1.0
    return int(math.floor((length - 1) / step)) + 1 if length else 0


def load_video_clip(path: str | os.PathLike, num_frames: int, fps: float | None, height: int, width: int,
                    generator: torch.Generator | None = None, frame_range: tuple[int, int] | None = None,
                    crop: tuple[int, int, int, int] | None = None, info: VideoInfo | None = None) -> torch.Tensor:
    """Decode one window of `num_frames` frames resampled to `fps` (None: the native rate), at a random start
    inside `frame_range` (`[start, end)` in the video's own frames; default the whole video). `crop` `(x0, y0, x1,
    y1)` is cut out first (e.g. a watermark-free area); then the short side is resized and the centre cropped to
    height×width. Only the window's frames are kept while decoding. Returns `[3, num_frames, height, width]` in
    [-1, 1]."""
    info = info or probe_video(path)
    first, last = frame_range or (0, info.frames)
    last = min(last, info.frames)
    available = frames_at(fps, info, (first, last))
    if available < num_frames:
        raise RefAlignInputError(f"video {path} gives {available} frames at {fps or info.fps:g} fps, "
                                 f"{num_frames} needed")
    step = info.fps / fps if fps else 1.0
    start = int(torch.randint(0, available - num_frames + 1, (1,), generator=generator)) if generator else 0
    wanted = [min(last - 1, first + round((start + i) * step)) for i in range(num_frames)]
    picked: dict[int, np.ndarray] = {}
    needed = set(wanted)
    with av.open(str(path)) as container:
        for index, frame in enumerate(container.decode(container.streams.video[0])):
            if index in needed:
                picked[index] = frame.to_ndarray(format="rgb24")
            if index >= wanted[-1]:
                break
    if len(picked) < len(needed):
        raise RefAlignInputError(f"video {path} ends before frame {wanted[-1]} (its header says {info.frames})")
    video = torch.from_numpy(np.stack([picked[i] for i in wanted])).permute(0, 3, 1, 2).float() / 255.0
    if crop is not None:
        x0, y0, x1, y1 = crop
        video = video[:, :, max(0, y0):y1, max(0, x0):x1]
        if video.shape[-1] < 2 or video.shape[-2] < 2:
            raise RefAlignInputError(f"video {path}: crop {crop} leaves nothing of its {info.width}x{info.height} "
                                     "frames")
    scale = max(height / video.shape[2], width / video.shape[3])
    size = (max(height, round(video.shape[2] * scale)), max(width, round(video.shape[3] * scale)))
    video = kornia.geometry.transform.resize(video, size, interpolation="bilinear", antialias=True)
    video = kornia.geometry.transform.center_crop(video, (height, width))
    return video.clamp(0, 1).mul(2).sub(1).permute(1, 0, 2, 3).contiguous()


def read_video_frame(path: str | os.PathLike, index: int) -> np.ndarray:
    """Frame `index` of a video as `[H, W, 3]` uint8."""
    with av.open(str(path)) as container:
        for i, frame in enumerate(container.decode(container.streams.video[0])):
            if i == index:
                return frame.to_ndarray(format="rgb24")
    raise RefAlignInputError(f"video {path} has no frame {index}")


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
