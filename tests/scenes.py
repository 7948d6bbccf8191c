"""Videos with a known answer, built from real photographs that scikit-image ships."""

import numpy as np
import skimage.data as data
import torch
import torch.nn.functional as F


def subject(name: str) -> torch.Tensor:
    """A real subject crop `[H, W, 3]` in [0, 1]."""
    crops = {
        "cat": (data.chelsea, (20, 280, 90, 350)),
        "cup": (data.coffee, (20, 380, 120, 560)),
        "rocket": (data.rocket, (20, 420, 180, 320)),
        "astronaut": (data.astronaut, (0, 300, 120, 330)),
    }
    loader, (y0, y1, x0, x1) = crops[name]
    return torch.from_numpy(loader()[y0:y1, x0:x1].copy()).float() / 255.0


def background(height: int, width: int) -> torch.Tensor:
    grass = torch.from_numpy(data.grass().copy()).float() / 255.0
    tile = grass[:height, :width] if grass.shape[0] >= height and grass.shape[1] >= width else \
        F.interpolate(grass[None, None], size=(height, width), mode="bilinear")[0, 0]
    tint = torch.tensor([0.45, 0.65, 0.35])
    return tile[..., None] * tint


def paste(frame: torch.Tensor, image: torch.Tensor, x: int, y: int, height: int) -> None:
    width = round(image.shape[1] * height / image.shape[0])
    resized = F.interpolate(image.permute(2, 0, 1)[None], size=(height, width), mode="bilinear",
                            antialias=True)[0].permute(1, 2, 0)
    h = min(height, frame.shape[0] - y)
    w = min(width, frame.shape[1] - x)
    frame[y:y + h, x:x + w] = resized[:h, :w]


def moving_video(names, frames: int = 17, height: int = 240, width: int = 416, static: bool = False,
                 size: int = 110) -> torch.Tensor:
    """The subjects moving (and re-scaling) across a grass background; `static` keeps them still."""
    video = []
    for t in range(frames):
        frame = background(height, width).clone()
        for k, name in enumerate(names):
            progress = 0.0 if static else t / max(1, frames - 1)
            extent = int(size * (1 + 0.35 * np.sin(np.pi * progress)))
            x = int(10 + k * width // 2 + progress * max(0, width // 2 - 10 - extent))
            y = int(20 + 40 * progress + 10 * k)
            paste(frame, subject(name), x, y, extent)
        video.append(frame)
    return torch.stack(video).clamp(0, 1)
