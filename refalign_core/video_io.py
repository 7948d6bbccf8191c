"""Writing videos and images: mp4 (H.264 via PyAV), animated webp/gif (Pillow), png."""

import math
import os
from pathlib import Path

import av
import numpy as np
import torch
from PIL import Image, ImageOps

from .errors import RefAlignInputError

VIDEO_SUFFIXES = (".mp4", ".webp", ".gif")


def to_uint8_frames(frames: torch.Tensor) -> np.ndarray:
    """Float in [0,1] (e.g. `[T, H, W, 3]`, ComfyUI IMAGE layout, or one `[H, W, 3]` image) -> uint8 numpy."""
    return (frames.detach().float().clamp(0, 1).cpu().numpy() * 255.0).round().astype(np.uint8)


def write_video(frames: torch.Tensor, path: str | os.PathLike, fps: float = 16.0, crf: int = 18) -> Path:
    """Write `[T, H, W, 3]` frames in [0,1] to .mp4 (H.264, yuv420p), .webp or .gif (animated, lossless webp)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in VIDEO_SUFFIXES:
        raise RefAlignInputError(f"output video: {path} must end in one of {VIDEO_SUFFIXES}")
    if not (isinstance(fps, (int, float)) and math.isfinite(fps) and 0 < fps <= 1000):
        raise RefAlignInputError(f"output video: fps must be a number in (0, 1000], got {fps!r}")
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
        raise RefAlignInputError(f"output video: frames must be [T, H, W, 3], got {tuple(frames.shape)}")
    data = to_uint8_frames(frames)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp" + suffix)
    try:  # written beside the target and renamed: a full disk or Ctrl-C leaves neither half a video nor a temp file
        if suffix == ".mp4":
            if data.shape[1] % 2 or data.shape[2] % 2:  # yuv420p needs even sizes
                data = np.pad(data, ((0, 0), (0, data.shape[1] % 2), (0, data.shape[2] % 2), (0, 0)), mode="edge")
            with av.open(str(tmp), mode="w", format="mp4") as container:
                stream = container.add_stream("libx264", rate=int(round(fps)))
                stream.width, stream.height, stream.pix_fmt = data.shape[2], data.shape[1], "yuv420p"
                stream.options = {"crf": str(crf)}
                for frame in data:
                    container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
                container.mux(stream.encode())
        else:
            images = [Image.fromarray(f) for f in data]
            extra = {"lossless": True} if suffix == ".webp" else {}
            images[0].save(tmp, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0, **extra)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_video_frames(path: str | os.PathLike) -> torch.Tensor:
    """Decode a video file to `[T, H, W, 3]` float in [0,1]."""
    with av.open(str(path)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    return torch.from_numpy(np.stack(frames)).float() / 255.0


def load_image(path: str | os.PathLike, fit: tuple[int, int] | None = None) -> Image.Image:
    """An image file, turned upright by its EXIF orientation (phone photos are stored sideways). `fit` (width,
    height) of where it will go lets a JPEG decode at a fraction of its size (never below twice the fit)."""
    try:
        image = Image.open(path)
        if fit is not None and image.format == "JPEG":
            image.draft("RGB", (2 * fit[0], 2 * fit[1]))
        image.load()
        return ImageOps.exif_transpose(image)
    except (OSError, ValueError) as e:
        raise RefAlignInputError(f"image {path}: cannot be read: {e}") from e
