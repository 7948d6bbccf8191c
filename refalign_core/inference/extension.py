"""Videos longer than one clip. Segment 1 is an ordinary clip; every later segment starts from the last `overlap`
frames of the one before, held fixed while the rest of the clip is denoised (flow-matching inpainting along time,
`sampler.hold_known_frames`), with the same references appended. The joined video keeps the previous segment's
frames at each seam and adds only the new ones, so no frame is duplicated.

The seam. The VAE is causal in time: latent frame 0 holds pixel frame 0 alone and every later latent frame holds
four. A clip therefore starts from `overlap` = 4n+1 frames re-encoded from pixels as the first n+1 latent frames of a
new clip (`seam="pixels"`, the default). Reusing the previous clip's last n+1 latent frames (`seam="latents"`) puts a
latent that holds four frames where the decoder expects one; `bench/extension_quality.py` measures both.

Colour match (optional): each new segment's frames get the per-channel mean and std of the previous segment's
overlap frames, measured on the same frames of the new segment (the regenerated overlap), so colour and contrast do
not drift from segment to segment."""

from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import RefAlignInputError
from ..validation import describe, one_of, whole_number
from .sampler import FRAMES_PER_LATENT, MAX_SEED, SamplingSettings, is_frame_count

SEAMS = ("pixels", "latents")
MAX_SEGMENTS = 64


@dataclass(frozen=True)
class Extension:
    """How many clips make the video and how each continues the one before (1 segment: one ordinary clip)."""

    segments: int = 1
    overlap: int = 5  # frames (4n+1) that each new segment starts from
    color_match: bool = False
    seam: str = "pixels"  # see the module docstring

    def __post_init__(self):
        object.__setattr__(self, "segments", whole_number("segments", self.segments, 1, MAX_SEGMENTS))
        overlap = whole_number("overlap", self.overlap, 1)
        if not is_frame_count(overlap):
            raise RefAlignInputError(f"overlap: must be 4n+1 frames (1, 5, 9, …), got {overlap}")
        object.__setattr__(self, "overlap", overlap)
        if not isinstance(self.color_match, bool):
            raise RefAlignInputError(f"color_match: expected true or false, got {describe(self.color_match)}")
        one_of("seam", self.seam, SEAMS)

    def check(self, settings: SamplingSettings) -> None:
        """The overlap leaves new frames in every segment."""
        if self.segments > 1 and self.overlap >= settings.num_frames:
            raise RefAlignInputError(f"overlap: must be fewer than num_frames ({settings.num_frames}) so each segment "
                                     f"adds frames, got {self.overlap}")

    def total_frames(self, num_frames: int) -> int:
        return num_frames + (self.segments - 1) * (num_frames - self.overlap)

    @property
    def known_latent_frames(self) -> int:
        return (self.overlap - 1) // FRAMES_PER_LATENT + 1


MAX_COLOR_SCALE = 2.0  # a near-flat overlap (a fade, a black frame) must not blow a segment's contrast up


def match_colors(frames: torch.Tensor, measured: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """frames `[F, H, W, 3]` in [0, 1] moved so that `measured` (some of them) gets the per-channel mean and std of
    `target` (the std scaled by at most MAX_COLOR_SCALE either way)."""
    dims = (0, 1, 2)
    scale = (target.std(dim=dims) / measured.std(dim=dims).clamp_min(1e-6)).clamp(1 / MAX_COLOR_SCALE,
                                                                                    MAX_COLOR_SCALE)
    return ((frames - measured.mean(dim=dims)) * scale + target.mean(dim=dims)).clamp(0, 1)


def join_segment(video: torch.Tensor, segment: torch.Tensor, overlap: int, color_match: bool = False) -> torch.Tensor:
    """The video so far `[F, H, W, 3]` and the next segment `[T, H, W, 3]`, whose first `overlap` frames regenerate
    the video's last ones -> `[F + T − overlap, H, W, 3]`: the seam keeps the video's frames, no frame twice."""
    return torch.cat([video, new_frames(video, segment, overlap, color_match)])


def new_frames(video: torch.Tensor, segment: torch.Tensor, overlap: int, color_match: bool = False) -> torch.Tensor:
    """What the segment adds to the video (`join_segment`): its frames after the overlap, colour-matched to the
    video's last `overlap` frames when asked. `video` may be just those last frames."""
    for name, frames in (("video", video), ("segment", segment)):
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise RefAlignInputError(f"{name}: frames [F, H, W, 3] expected, got {tuple(frames.shape)}")
    if video.shape[1:] != segment.shape[1:]:
        raise RefAlignInputError(f"segment: {segment.shape[2]}x{segment.shape[1]} frames do not match the video's "
                                 f"{video.shape[2]}x{video.shape[1]}")
    if not 1 <= overlap <= len(video) or overlap >= len(segment):
        raise RefAlignInputError(f"overlap: must be at least 1, at most the video's {len(video)} frames and fewer "
                                 f"than the segment's {len(segment)}, got {overlap}")
    if color_match:
        segment = match_colors(segment, segment[:overlap], video[-overlap:])
    return segment[overlap:]


def generate_segments(denoiser, codec, text, settings: SamplingSettings, reference_latents: torch.Tensor,
                      extension: Extension, *, callback: Callable | None = None,
                      cancel_check: Callable | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents `[S, C, T', h, w]`, one clip per segment, and the joined frames `[F, H, W, 3]` in [0, 1],
    F = `extension.total_frames`). Segment s (0-based) is sampled with seed + s, so segments differ in noise.
    `generate` has checked the extension against the settings."""
    if codec is None:
        raise RefAlignInputError("segments: extension continues from decoded frames and needs a VAE")
    steps, overlap = settings.steps, extension.overlap
    segment_latents, pieces, tail, latents = [], [], None, None  # tail: the video's last `overlap` frames
    for index in range(extension.segments):
        def step_callback(step, total, step_latents, index=index):
            if callback is not None:
                callback(index * steps + step, extension.segments * steps, step_latents)

        known = None
        if tail is not None:
            known = (codec.encode_video(tail) if extension.seam == "pixels"
                     else latents[:, :, -extension.known_latent_frames:])
        latents = denoiser(text, reference_latents, settings.replace(seed=(settings.seed + index) % (MAX_SEED + 1)),
                           callback=step_callback, cancel_check=cancel_check, known_latents=known)
        frames = codec.decode(latents)
        pieces.append(frames if tail is None else new_frames(tail, frames, overlap, extension.color_match))
        tail = torch.cat([tail, pieces[-1]])[-overlap:] if tail is not None else frames[-overlap:]
        segment_latents.append(latents)
    return torch.cat(segment_latents), torch.cat(pieces)
