"""Extension in ComfyUI: RefAlign Segment Latent (the next segment's latent and noise mask, so ComfyUI's samplers
and the RefAlign Guider do the inpainting) and RefAlign Join Segments (the video so far + the new segment, no frame
twice, optional colour match). The rule is the core's (`refalign_core.inference.extension`)."""

import torch
from comfy_api.latest import io

from refalign_core.errors import RefAlignInputError
from refalign_core.inference.extension import Extension, join_segment
from refalign_core.inference.sampler import FRAMES_PER_LATENT, SamplingSettings

from . import runtime
from .native import segment_latent
from .sampler import video_size_inputs

DEFAULT_OVERLAP = Extension().overlap


def overlap_input():
    return io.Int.Input("overlap", default=DEFAULT_OVERLAP, min=1, max=1021, step=FRAMES_PER_LATENT,
                        tooltip="Frames (4n+1) the new segment starts from: the last ones of the video so far.")


def next_segment_latent(vae, video: torch.Tensor, settings: SamplingSettings, overlap: int, batch_size: int) -> dict:
    """LATENT {samples, noise_mask}: the video's last `overlap` frames re-encoded from pixels as the first latent
    frames of a new clip (held: mask 0), the rest empty (mask 1)."""
    extension = Extension(segments=2, overlap=overlap)
    extension.check(settings)
    if video.ndim != 4 or tuple(video.shape[1:3]) != (settings.height, settings.width):
        raise RefAlignInputError(f"video: frames [F, {settings.height}, {settings.width}, C] expected (the size of the "
                                 f"segment), got {tuple(video.shape)}")
    if video.shape[0] < overlap:
        raise RefAlignInputError(f"overlap: {overlap} frames, but the video has {video.shape[0]}")
    known = vae.encode(video[-overlap:, :, :, :3]).float().cpu()  # [1, C, P, h, w] in the VAE's space
    grid = (extension.known_latent_frames, settings.height // 8, settings.width // 8)
    if known.ndim != 5 or tuple(known.shape[2:]) != grid:
        raise RefAlignInputError(f"vae: encoded {overlap} frames to {tuple(known.shape)}, not the Wan2.1 grid "
                                 f"[1, C, {', '.join(map(str, grid))}]; use the Wan2.1 VAE (or the bundle's)")
    latent, mask = segment_latent((batch_size, *settings.latent_shape(known.shape[1])[1:]), known)
    out = runtime.intermediate_device()
    return {"samples": latent.to(out), "noise_mask": mask.to(out)}


class RefAlignSegmentLatent(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RefAlignSegmentLatent", display_name="RefAlign Segment Latent", category="RefAlign",
            description="Continues a video: the latent of the next segment, whose first frames are the video's last "
                        "`overlap` frames (re-encoded from pixels, the causal VAE's first-frame convention) held by a "
                        "noise mask while the rest is generated. Sample it with the same RefAlign Guider and "
                        "references (SamplerCustomAdvanced, another noise seed), decode, then RefAlign Join Segments.",
            inputs=[
                io.Vae.Input("vae", tooltip="The Wan2.1 VAE (or a bundle's VAE from RefAlign Loader)."),
                io.Image.Input("video", tooltip="The video so far (its last frames start the new segment)."),
                *video_size_inputs(),
                overlap_input(),
                io.Int.Input("batch_size", default=1, min=1, max=4096, tooltip="Videos per run."),
            ],
            outputs=[io.Latent.Output(display_name="latent", tooltip="The segment's latent with its noise mask.")],
        )

    @classmethod
    def execute(cls, vae, video, width, height, num_frames, overlap, batch_size) -> io.NodeOutput:
        settings = SamplingSettings(width=width, height=height, num_frames=num_frames)  # validates the sizes
        return io.NodeOutput(next_segment_latent(vae, video, settings, overlap, batch_size))


class RefAlignJoinSegments(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RefAlignJoinSegments", display_name="RefAlign Join Segments", category="RefAlign",
            description="Appends a segment made from RefAlign Segment Latent to the video: its first `overlap` "
                        "frames regenerate the video's last ones and are dropped, so no frame appears twice. "
                        "color_match gives the segment the colour statistics of the video on those frames, so "
                        "colour and contrast do not drift over many segments.",
            inputs=[
                io.Image.Input("video", tooltip="The video so far."),
                io.Image.Input("segment", tooltip="The decoded new segment."),
                overlap_input(),
                io.Boolean.Input("color_match", default=True,
                                 tooltip="Match the segment's colours to the video on the overlap frames."),
            ],
            outputs=[io.Image.Output(display_name="video", tooltip="The joined video.")],
        )

    @classmethod
    def execute(cls, video, segment, overlap, color_match) -> io.NodeOutput:
        joined = join_segment(video[..., :3].float().cpu(), segment[..., :3].float().cpu(), overlap, color_match)
        return io.NodeOutput(joined.to(runtime.intermediate_device()))
