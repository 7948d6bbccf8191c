"""Writing videos and images: mp4 (H.264 via PyAV), animated webp/gif (Pillow), png; each written whole or not at
all (`files.write_atomic`)."""

import math
import os
import warnings
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
from PIL import Image, ImageOps

from ..errors import RefAlignInputError
from ..files import write_atomic
from .references import check_pixels

VIDEO_SUFFIXES = (".mp4", ".webp", ".gif")
# The frame rates each container stores, (lowest, highest) fps. mp4: an exact rational rate (FFmpeg's muxer refuses
# a frame period past 65536 s); gif: frame delays in whole centiseconds, 1..65535; webp: in whole milliseconds,
# 1..2^24-1 per frame and 2^31-1 in all.
FPS_RANGES = {".mp4": (Fraction(1, 65536), Fraction(1000)), ".gif": (Fraction(100, 65535), Fraction(100)),
              ".webp": (Fraction(1000, 2**24 - 1), Fraction(1000))}
DELAY_TICKS = {".gif": 100, ".webp": 1000}  # the unit of a frame delay, per second
WEBP_MAX_MS = 2**31 - 1


def to_uint8_frames(frames: torch.Tensor) -> np.ndarray:
    """Float in [0,1] (e.g. `[T, H, W, 3]`, ComfyUI IMAGE layout, or one `[H, W, 3]` image) -> uint8 numpy."""
    return (frames.detach().float().clamp(0, 1).cpu().numpy() * 255.0).round().astype(np.uint8)


def checked_frames(frames, what: str) -> torch.Tensor:
    """Video frames `[T, H, W, 3]` (ComfyUI IMAGE layout) as float in [0, 1]: float in [0, 1] or uint8 in [0, 255] are
    accepted; anything else is one error naming `what`."""
    if not torch.is_tensor(frames) or frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
        shape = tuple(frames.shape) if hasattr(frames, "shape") else type(frames).__name__
        raise RefAlignInputError(f"{what}: frames must be a tensor [T, H, W, 3], got {shape}")
    if frames.dtype == torch.uint8:
        return frames.float() / 255.0
    if not frames.is_floating_point():
        raise RefAlignInputError(f"{what}: frames must be float in [0, 1] or uint8 in [0, 255], got {frames.dtype}")
    if not bool(torch.isfinite(frames).all()):
        raise RefAlignInputError(f"{what}: the frames have NaN or infinite values")
    if float(frames.max()) > 1.5:
        raise RefAlignInputError(f"{what}: float frames must be in [0, 1], got values up to {float(frames.max()):g} "
                                 f"(0-255 values? pass uint8 or divide by 255)")
    return frames


def video_rate(fps, path: str | os.PathLike, num_frames: int | None = None, what: str = "fps") -> Fraction:
    """`fps` as the exact rate the container of `path` stores: a float by its decimal (23.976 is 2997/125), within the
    32-bit ratios FFmpeg keeps (else the nearest such ratio). Refused, naming `what`, outside what the container
    stores (`FPS_RANGES`; a webp also lasts under 2^31 ms)."""
    suffix = Path(path).suffix.lower()
    if suffix not in FPS_RANGES:
        raise RefAlignInputError(f"output video: {path} must end in one of {VIDEO_SUFFIXES}")
    if isinstance(fps, bool) or not isinstance(fps, (int, float, Fraction)) or \
            isinstance(fps, float) and not math.isfinite(fps):
        raise RefAlignInputError(f"{what} must be a finite number, got {fps!r}")
    exact = Fraction(repr(float(fps))) if isinstance(fps, float) else Fraction(fps)
    rate = exact if max(exact.numerator, exact.denominator) < 2**31 else exact.limit_denominator(2**31 // 1000)
    low, high = FPS_RANGES[suffix]
    if not low <= rate <= high:
        raise RefAlignInputError(f"{what} {float(fps):g}: a {suffix} video stores {float(low):.4g} to "
                                 f"{float(high):g} fps")
    if suffix == ".webp" and num_frames is not None and _end_tick(rate, num_frames, 1000) > WEBP_MAX_MS:
        raise RefAlignInputError(f"{what} {float(fps):g}: {num_frames} frames would last past a webp's 2^31 ms")
    return rate


def _end_tick(rate: Fraction, frames: int, ticks: int) -> int:
    """When the first `frames` frames end, in whole 1/`ticks` s, rounded half up from the exact time frames/rate."""
    return math.floor(Fraction(ticks * frames) / rate + Fraction(1, 2))


def frame_delays(rate: Fraction, count: int, ticks: int) -> list[int]:
    """Per-frame delays in 1/`ticks` s for a container that stores whole ticks: each frame ends within half a tick of
    its exact time, so the video keeps the rate exactly over its length (16 fps in a gif: 6, 7, 6, 6, 6, 7, … cs)."""
    ends = [_end_tick(rate, i, ticks) for i in range(count + 1)]
    return [end - start for start, end in zip(ends, ends[1:])]


def write_video(frames: torch.Tensor, path: str | os.PathLike, fps: float | Fraction = 16.0, crf: int = 18) -> Path:
    """Write `[T, H, W, 3]` frames in [0,1] to .mp4 (H.264, yuv420p), .webp or .gif (animated, lossless webp), at the
    rate `video_rate` says the container stores."""
    path = Path(path)
    frames = checked_frames(frames, "output video")
    rate = video_rate(fps, path, frames.shape[0], "output video: fps")
    suffix = path.suffix.lower()
    data = to_uint8_frames(frames)
    if suffix == ".mp4" and (data.shape[1] % 2 or data.shape[2] % 2):  # yuv420p needs even sizes
        data = np.pad(data, ((0, 0), (0, data.shape[1] % 2), (0, data.shape[2] % 2), (0, 0)), mode="edge")

    def write(tmp: Path) -> None:
        if suffix == ".mp4":
            with av.open(str(tmp), mode="w", format="mp4") as container:
                stream = container.add_stream("libx264", rate=rate)
                stream.width, stream.height, stream.pix_fmt = data.shape[2], data.shape[1], "yuv420p"
                stream.options = {"crf": str(crf)}
                for frame in data:
                    container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
                container.mux(stream.encode())
        else:
            images = [Image.fromarray(f) for f in data]
            ticks = DELAY_TICKS[suffix]
            delays_ms = [d * 1000 // ticks for d in frame_delays(rate, len(images), ticks)]
            extra = {"lossless": True} if suffix == ".webp" else {}
            images[0].save(tmp, format=suffix[1:].upper(), save_all=True, append_images=images[1:],
                           duration=delays_ms, loop=0, **extra)

    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(path, write)


def read_video_frames(path: str | os.PathLike) -> torch.Tensor:
    """Decode a video file to `[T, H, W, 3]` float in [0,1]."""
    with av.open(str(path)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    return torch.from_numpy(np.stack(frames)).float() / 255.0


def load_image(path: str | os.PathLike, fit: tuple[int, int] | None = None) -> Image.Image:
    """An image file, turned upright by its EXIF orientation (phone photos are stored sideways). `fit` (width,
    height) of where it will go lets a JPEG decode at a fraction of its size (never below twice the fit). Larger than
    `MAX_REFERENCE_PIXELS` (at the decoded size) is refused before decoding."""
    try:
        with warnings.catch_warnings():  # between 1x and 2x Pillow's limit it only warns: refused below instead
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
            if fit is not None and image.format == "JPEG":
                image.draft("RGB", (2 * fit[0], 2 * fit[1]))
            check_pixels(image, f"image {path}")
            image.load()
        return ImageOps.exif_transpose(image)
    except RefAlignInputError:
        raise
    except Image.DecompressionBombError as e:
        raise RefAlignInputError(f"image {path}: larger than Pillow's decompression-bomb limit: {e}") from None
    except (OSError, ValueError) as e:
        raise RefAlignInputError(f"image {path}: cannot be read: {e}") from e
