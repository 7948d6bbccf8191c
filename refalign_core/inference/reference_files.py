"""Encoded references saved to a file and read back: one format for the command line (`encode-references`,
`generate --reference-latents`) and the ComfyUI nodes (RefAlign Save / Load Encoded References).

The file is a .safetensors holding `reference_latents` `[1, C, K, H/8, W/8]` (fp32, the DiT's normalised latent
space, each reference fitted on white at W×H and encoded alone) and string metadata: the format and its version, the
fitted size, the number of references and their names, and the VAE's probe.

The VAE is identified by what it does, not by its class or key names: the core's VAE (diffusers `AutoencoderKLWan`,
the toy VAE) and ComfyUI's VAE hold the same weights under other classes and names. `probe_image()` (a fixed 32×32
colour pattern, computed, not random) is encoded through the codec exactly as a reference is, and its DiT-space
latents are stored (JSON, 5 decimals). On load the VAE at hand encodes the same probe; the file is refused when the
largest difference exceeds `PROBE_TOLERANCE` × the largest stored |value|.

Measured (torch 2.13, CPU; max |difference| / max |stored|): the same weights give ≤ 1.1e-7 across classes in fp32
(diffusers vs ComfyUI's WanVAE, a randomly initialised Wan2.1 VAE), ≤ 0.0051 for fp32 vs bf16 in diffusers, ≤ 0.0029
vs ComfyUI's bf16 VAE, and ≤ 0.008 for the toy VAE in fp32 vs bf16; other VAEs give ≥ 0.35 (two random Wan2.1 VAEs:
0.35; two tiny ones: 0.40; the toy VAE vs a tiny Wan VAE: 1.0). 0.05 leaves a margin of 6× on each side.

A file without this metadata (written by `encode-references` before it wrote any) is read with a warning: its VAE
and size cannot be checked, only its shape and values."""

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import RefAlignInputError
from ..models.safetensors_io import read_safetensors, write_safetensors
from .references import MAX_REFERENCES
from .sampler import SIZE_MULTIPLE, is_video_size

logger = logging.getLogger(__name__)

FORMAT = "refalign-reference-latents"
VERSION = 1
KEY = "reference_latents"
PIXELS_PER_LATENT = 8  # the Wan2.1 VAE's (and the toy VAE's) spatial compression
PROBE_SIZE = 32  # pixels: a multiple of 16 that the Wan2.1 VAE, ComfyUI's and the toy VAE all encode
PROBE_DECIMALS = 5
PROBE_TOLERANCE = 0.05  # max |difference| / max |stored value|; see the module docstring for the measurements


def probe_image(size: int = PROBE_SIZE) -> torch.Tensor:
    """The fixed probe `[1, 3, size, size]` in [0, 1]: a red ramp across, a green ramp down, a blue 8-pixel checker
    (computed from the pixel positions, so every host makes the same image)."""
    y, x = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    red, green = x / (size - 1), y / (size - 1)
    blue = ((x // 8 + y // 8) % 2) * 0.75 + 0.125
    return torch.stack([red, green, blue]).float()[None]


def probe_latents(codec) -> torch.Tensor:
    """The probe encoded by `codec` (anything with `encode_references`: the core's `VAECodec`, the nodes'
    `ComfyVAECodec`), as a reference is: `[1, C, 1, h, w]`, fp32 on the CPU."""
    return codec.encode_references(probe_image()).float().cpu()


def _probe(vae_probe) -> torch.Tensor:
    """A codec or the probe latents it gave."""
    return vae_probe.float().cpu() if torch.is_tensor(vae_probe) else probe_latents(vae_probe)


def probe_difference(stored: torch.Tensor, probe: torch.Tensor) -> float:
    """max |probe − stored| / max |stored| (inf for other shapes: another latent layout is another VAE)."""
    if tuple(stored.shape) != tuple(probe.shape):
        return math.inf
    scale = max(float(stored.abs().max()), 1e-6)
    return float((probe - stored).abs().max()) / scale


@dataclass(frozen=True)
class EncodedReferences:
    """A reference-latents file as read: the latents `[1, C, K, h, w]` (DiT space) and what its metadata says.
    width / height / vae_probe are None for a file without metadata (nothing to check them against)."""

    latents: torch.Tensor
    width: int | None = None
    height: int | None = None
    names: tuple[str, ...] = ()
    vae_probe: torch.Tensor | None = None
    source: str = ""  # the file, for messages

    @property
    def count(self) -> int:
        return self.latents.shape[2]

    @property
    def checked(self) -> bool:
        """Whether the file carries the metadata that `check_size` / `check_vae` compare against."""
        return self.vae_probe is not None

    def check_size(self, width: int, height: int, what: str) -> None:
        """Refuses references fitted at another size than `width`×`height` (or, without metadata, latents of
        another grid)."""
        if self.width is not None and (self.width, self.height) != (width, height):
            raise RefAlignInputError(
                f"{what} {self.source}: the references were fitted at {self.width}x{self.height}, but this run is "
                f"{width}x{height}; encode them again at {width}x{height} (or set width and height to "
                f"{self.width}x{self.height})")
        grid = (height // PIXELS_PER_LATENT, width // PIXELS_PER_LATENT)
        if tuple(self.latents.shape[3:]) != grid:
            raise RefAlignInputError(
                f"{what} {self.source}: the reference latents {tuple(self.latents.shape)} are for "
                f"{self.latents.shape[4] * PIXELS_PER_LATENT}x{self.latents.shape[3] * PIXELS_PER_LATENT}, but this "
                f"run is {width}x{height} (expected [1, C, K, {grid[0]}, {grid[1]}]); encode them again at that size")

    def check_vae(self, vae_probe, what: str) -> None:
        """Refuses latents from another VAE than the one `vae_probe` (a codec, or its `probe_latents`) stands for.
        A file without metadata cannot be checked (`load_reference_latents` warned about it)."""
        if self.vae_probe is None:
            return
        probe = _probe(vae_probe)
        difference = probe_difference(self.vae_probe, probe)
        if difference > PROBE_TOLERANCE:
            got = "another latent layout" if math.isinf(difference) else f"a probe {difference:.3g} apart"
            raise RefAlignInputError(
                f"{what} {self.source}: the references were encoded with another VAE than this one ({got}; the same "
                f"VAE stays within {PROBE_TOLERANCE}); encode them again with this VAE, or use the VAE they were "
                "encoded with")


def _check_latents(latents, what: str) -> torch.Tensor:
    if not torch.is_tensor(latents) or not latents.is_floating_point():
        raise RefAlignInputError(f"{what}: reference latents must be a float tensor, got "
                                 f"{getattr(latents, 'dtype', type(latents).__name__)}")
    if latents.ndim != 5 or latents.shape[0] != 1 or not 1 <= latents.shape[2] <= MAX_REFERENCES:
        raise RefAlignInputError(f"{what}: reference latents must be [1, C, K, H/8, W/8] with K = 1 … "
                                 f"{MAX_REFERENCES} references, got shape {tuple(latents.shape)}")
    if not bool(torch.isfinite(latents).all()):
        raise RefAlignInputError(f"{what}: the reference latents have NaN or infinite values")
    return latents.detach().float().cpu()


def _check_size(width, height, what: str) -> tuple[int, int]:
    if not all(isinstance(v, int) and not isinstance(v, bool) and is_video_size(v) for v in (width, height)):
        raise RefAlignInputError(f"{what}: width and height must be positive multiples of {SIZE_MULTIPLE}, got "
                                 f"{width}x{height}")
    return width, height


def save_reference_latents(path: str | os.PathLike, latents: torch.Tensor, *, width: int, height: int, vae_probe,
                           names=None, what: str = "reference latents") -> Path:
    """Write `latents` `[1, C, K, height/8, width/8]` (DiT space) with the metadata (module docstring), atomically:
    the file is whole or absent. vae_probe: the codec that encoded them (`VAECodec`, `ComfyVAECodec`) or its
    `probe_latents`. names: one per reference (default "reference 1" …)."""
    latents = _check_latents(latents, what)
    width, height = _check_size(width, height, what)
    encoded = EncodedReferences(latents, width, height, source=str(path))
    encoded.check_size(width, height, what)
    names = [f"reference {k + 1}" for k in range(encoded.count)] if names is None else [str(n) for n in names]
    if len(names) != encoded.count:
        raise RefAlignInputError(f"{what}: {len(names)} names for {encoded.count} references")
    probe = _probe(vae_probe)
    if not bool(torch.isfinite(probe).all()):
        raise RefAlignInputError(f"{what}: the VAE's probe has NaN or infinite values")
    metadata = {"format": FORMAT, "version": str(VERSION), "width": str(width), "height": str(height),
                "count": str(encoded.count), "names": json.dumps(names),
                "vae_probe": json.dumps({"size": PROBE_SIZE, "shape": list(probe.shape),
                                         "values": [round(v, PROBE_DECIMALS) for v in probe.flatten().tolist()]})}
    write_safetensors({KEY: latents}, path, metadata)
    return Path(path)


def _metadata(metadata: dict, count: int, what: str) -> dict:
    """The checked fields of a file's metadata."""
    try:
        version = int(metadata.get("version", ""))
        width, height, stored_count = (int(metadata[k]) for k in ("width", "height", "count"))
        names = json.loads(metadata["names"])
        probe = json.loads(metadata["vae_probe"])
        values = torch.tensor(probe["values"], dtype=torch.float32).reshape(probe["shape"])
    except (KeyError, ValueError, TypeError, RuntimeError) as e:
        raise RefAlignInputError(f"{what}: its {FORMAT} metadata is unreadable ({type(e).__name__}: {e}); encode "
                                 "the references again") from None
    if metadata["format"] != FORMAT or version != VERSION:
        raise RefAlignInputError(f"{what}: format {metadata['format']!r} version {version}; this RefAlign reads "
                                 f"{FORMAT!r} version {VERSION}")
    if stored_count != count or not isinstance(names, list) or len(names) != count:
        raise RefAlignInputError(f"{what}: its metadata lists {stored_count} references, the latents hold {count}")
    _check_size(width, height, what)
    return {"width": width, "height": height, "names": tuple(map(str, names)), "vae_probe": values}


def load_reference_latents(path: str | os.PathLike, *, width: int | None = None, height: int | None = None,
                           vae_probe=None, what: str = "reference latents") -> EncodedReferences:
    """Read a reference-latents file, checked: shape, finite values, and, when given, the size the run uses
    (`width`, `height`) and the VAE it has (`vae_probe`: a codec or its `probe_latents`). Each mismatch is one
    RefAlignInputError naming `what` (the input: "--reference-latents", a node's input) and the file. A file without
    metadata loads with a warning that it cannot be checked."""
    tensors, metadata = read_safetensors(path, f"{what} {path}")
    if KEY not in tensors:
        raise RefAlignInputError(f"{what} {path} holds no '{KEY}' tensor (it has {sorted(tensors)[:6]})")
    latents = _check_latents(tensors[KEY], f"{what} {path}")
    if "format" in metadata:
        encoded = EncodedReferences(latents, source=str(path), **_metadata(metadata, latents.shape[2],
                                                                           f"{what} {path}"))
        encoded.check_size(encoded.width, encoded.height, what)  # the latents are what the metadata says
    else:
        logger.warning("%s %s has no RefAlign metadata (written by an older encode-references): it is used as it "
                       "is, but the VAE and the size it was encoded with cannot be checked; encode the references "
                       "again to have them checked", what, path)
        encoded = EncodedReferences(latents, source=str(path))
    if width is not None and height is not None:
        encoded.check_size(width, height, what)
    if vae_probe is not None:
        encoded.check_vae(vae_probe, what)
    return encoded
