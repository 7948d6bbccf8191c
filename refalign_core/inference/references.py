"""Reference preprocessing: aspect-fit onto a white W×H canvas (never centre-crop), optional mask -> white
background, RGBA / grayscale handled; each reference VAE-encoded on its own as a 1-frame clip."""

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import kornia

from ..errors import RefAlignInputError
from ..models.vae import encode_video
from .sampler import SIZE_MULTIPLE, is_video_size

logger = logging.getLogger(__name__)

MAX_REFERENCES = 4  # what the pack supports (the spec has no hard limit; RoPE has 1024 temporal positions)
RECOMMENDED_MAX_REFERENCES = 3  # the released models were trained with 1-3 references
MAX_REFERENCE_PIXELS = 89_478_485  # Pillow's decompression-bomb limit (about 9459×9459); larger images are refused


@dataclass(frozen=True)
class Reference:
    """One subject reference: the image (PIL, numpy or tensor, `[H,W,C]` or `[C,H,W]`), an optional mask (`[H,W]`,
    1 = subject; else the image's alpha, if any) and an optional name (used in reports)."""

    image: Any
    mask: Any = None
    name: str | None = None


def as_references(items) -> list[Reference]:
    """A list of `Reference`s or bare images (each becomes `Reference(image)`), or a ComfyUI IMAGE batch
    `[K,H,W,C]` (one reference per image). One bare `[H,W,C]` tensor is refused: it would read as H references."""
    if torch.is_tensor(items) or isinstance(items, np.ndarray):
        if items.ndim != 4:
            raise RefAlignInputError(f"references: a tensor of references must be a batch [K,H,W,C], got shape "
                                     f"{tuple(items.shape)}; pass one image as a list [image]")
        items = list(items)
    if isinstance(items, (str, bytes)) or not hasattr(items, "__iter__"):
        raise RefAlignInputError(f"references: expected a list of images or Reference records, got {type(items).__name__}")
    return [item if isinstance(item, Reference) else Reference(item) for item in items]


def _is_pil(image) -> bool:
    return hasattr(image, "convert") and hasattr(image, "mode")


def check_pixels(image, name: str) -> None:
    """A PIL image (opened, maybe not decoded) of at most `MAX_REFERENCE_PIXELS`."""
    if image.width * image.height > MAX_REFERENCE_PIXELS:
        raise RefAlignInputError(f"{name}: {image.width}x{image.height} is larger than {MAX_REFERENCE_PIXELS:,} "
                                 "pixels; downscale it first")


def _pil_to_array(image, name: str) -> np.ndarray:
    """A PIL image as an array in [0, 1] (16-bit and 32-bit grey scaled by their own range, not clipped white)."""
    check_pixels(image, name)
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        values = np.asarray(image, dtype=np.float32)
        return values / 65535.0 if image.mode != "F" else values / (255.0 if values.max() > 1 else 1.0)
    rgb = image.convert("RGBA") if image.mode in ("RGBA", "LA", "PA", "P") else image.convert("RGB")
    return np.asarray(rgb, dtype=np.float32) / 255.0


def to_chw(image, name: str = "reference") -> tuple[torch.Tensor, torch.Tensor | None]:
    """PIL image, numpy array or tensor (`[H,W,C]` as ComfyUI's IMAGE, or `[C,H,W]`), uint8 / uint16 or float in
    [0,1] -> (`[3,H,W]` float in [0,1], alpha `[H,W]` or None)."""
    if _is_pil(image):
        image = _pil_to_array(image, name)
    tensor = image if torch.is_tensor(image) else torch.from_numpy(np.array(image))
    if tensor.dtype == torch.uint8:
        tensor = tensor.float() / 255.0
    elif tensor.dtype in (torch.uint16, torch.int32):
        tensor = tensor.float() / 65535.0
    tensor = tensor.float()
    if not bool(torch.isfinite(tensor).all()):
        raise RefAlignInputError(f"{name}: the image has NaN or infinite values")
    if tensor.ndim == 2:
        tensor = tensor.unsqueeze(-1)
    if tensor.ndim != 3:
        raise RefAlignInputError(f"{name}: expected one image [H,W,C] or [C,H,W], got shape {tuple(tensor.shape)}")
    if tensor.shape[-1] in (1, 2, 3, 4) and tensor.shape[0] not in (1, 2, 3, 4):
        tensor = tensor.permute(2, 0, 1)
    elif tensor.shape[0] not in (1, 2, 3, 4):
        raise RefAlignInputError(f"{name}: cannot find the channel axis (1-4 channels) in shape {tuple(tensor.shape)}")
    alpha = None
    if tensor.shape[0] in (2, 4):
        tensor, alpha = tensor[:-1], tensor[-1]
    if tensor.shape[0] == 1:
        tensor = tensor.expand(3, -1, -1)
    if tensor.shape[1] < 2 or tensor.shape[2] < 2:
        raise RefAlignInputError(f"{name}: image is too small ({tuple(tensor.shape[1:])})")
    return tensor.clamp(0, 1), alpha


def _mask_bbox(mask: torch.Tensor) -> tuple[int, int, int, int] | None:
    ys, xs = torch.nonzero(mask > 0.5, as_tuple=True)
    if len(ys) == 0:
        return None
    return int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1


def _reduce_large(image, mask, width: int, height: int, name: str):
    """A PIL image (and PIL mask) far larger than the canvas, box-reduced by a whole factor first, so a 12 MP photo
    is never turned into full-size float tensors (16/32-bit images are left to `to_chw`, which keeps their range)."""
    if not _is_pil(image) or not (mask is None or _is_pil(mask)) or image.mode not in ("RGB", "RGBA", "L", "LA",
                                                                                         "P", "PA", "1"):
        return image, mask
    check_pixels(image, name)
    factor = min(image.width // (2 * width), image.height // (2 * height))
    if factor < 2:
        return image, mask
    if image.mode in ("P", "PA", "1"):
        image = image.convert("RGBA" if image.mode != "1" else "L")
    return image.reduce(factor), mask.reduce(factor) if mask is not None else None


def fit_on_white(image, width: int, height: int, mask=None, crop_to_mask: bool = True,
                 name: str = "reference") -> torch.Tensor:
    """One reference -> `[3, height, width]` in [0,1]: scaled to fit (aspect kept), centred on white.

    mask `[H,W]` (1 = subject) or the image's alpha turns the background white; with `crop_to_mask` the image is
    first cropped to the mask's bounding box, as in training."""
    image, mask = _reduce_large(image, mask, width, height, name)
    rgb, alpha = to_chw(image, name)
    if mask is not None:
        mask = (mask if torch.is_tensor(mask) else torch.from_numpy(np.array(mask))).float().squeeze()
        if mask.max() > 1:
            mask = mask / 255.0
        if mask.shape != rgb.shape[1:]:
            raise RefAlignInputError(f"{name} mask: shape {tuple(mask.shape)} must equal the image's {tuple(rgb.shape[1:])}")
    elif alpha is not None:
        mask = alpha
    if mask is not None:
        rgb = rgb * mask + (1 - mask)
        box = _mask_bbox(mask) if crop_to_mask else None
        if box is None and crop_to_mask:
            raise RefAlignInputError(f"{name} mask is empty: nothing of the subject is left")
        if box is not None:
            rgb = rgb[:, box[0]:box[1], box[2]:box[3]]
    h, w = rgb.shape[1:]
    scale = min(width / w, height / h)
    new_h, new_w = max(1, round(h * scale)), max(1, round(w * scale))
    resized = kornia.geometry.transform.resize(rgb[None], (new_h, new_w), interpolation="bilinear",
                                               antialias=True)[0].clamp(0, 1)
    canvas = torch.ones(3, height, width)
    top, left = (height - new_h) // 2, (width - new_w) // 2
    canvas[:, top:top + new_h, left:left + new_w] = resized
    return canvas


def prepare_references(references, width: int, height: int, max_references: int | None = None) -> torch.Tensor:
    """K references (`Reference`s or bare images) -> `[K, 3, height, width]` in [0,1], each fitted on white. More
    than 3 is allowed (with a warning): the released models were trained with at most 3."""
    references = as_references(references)
    if not references:
        raise RefAlignInputError("references: at least one reference image is needed")
    if max_references is not None and len(references) > max_references:
        raise RefAlignInputError(f"references: at most {max_references} are supported, got {len(references)}")
    if not (is_video_size(width) and is_video_size(height)):
        raise RefAlignInputError(f"width and height must be positive multiples of {SIZE_MULTIPLE}, got "
                                 f"{width}x{height}")
    if len(references) > RECOMMENDED_MAX_REFERENCES:
        logger.warning("%d references: the released RefAlign models were trained with at most %d; identity may "
                       "suffer", len(references), RECOMMENDED_MAX_REFERENCES)
    return torch.stack([
        fit_on_white(ref.image, width, height, ref.mask, name=ref.name or f"reference {i + 1}")
        for i, ref in enumerate(references)
    ])


def encode_references(vae, references: torch.Tensor) -> torch.Tensor:
    """`[K, 3, H, W]` in [0,1] -> reference latents `[1, 16, K, H/8, W/8]`, each encoded alone as a 1-frame clip
    (a batch of K one-frame clips, never one K-frame video: the VAE is causal in time)."""
    clips = references.mul(2).sub(1).unsqueeze(2)  # [K, 3, 1, H, W]
    latents = encode_video(vae, clips)  # [K, 16, 1, h, w]
    return latents.squeeze(2).transpose(0, 1).unsqueeze(0).cpu().float()
