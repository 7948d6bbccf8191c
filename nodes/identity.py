"""RefAlign Identity Check: per-subject identity, confusion, copy-paste and motion of generated frames."""

import numpy as np
import torch
import torch.nn.functional as F
from comfy_api.latest import io

from refalign_core.errors import RefAlignInputError
from refalign_core.metrics.identity import IdentitySettings
from refalign_core.metrics.identity_sheet import evaluate
from refalign_core.models.vfm import load_vfm

from . import runtime
from .references import REFERENCES

MAX_SUBJECTS = 4
_DEFAULT_BACKBONE = {}


class ClipVisionTokens(torch.nn.Module):
    """A ComfyUI CLIP_VISION model (CLIP, SigLIP, DINOv2) as an identity backbone: the patch tokens of its last
    hidden state, resampled from its square grid to the 16-pixel grid of the image."""

    def __init__(self, clip_vision):
        super().__init__()
        self.clip_vision = clip_vision

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        gh, gw = images.shape[-2] // 16, images.shape[-1] // 16
        hidden = self.clip_vision.encode_image(images.permute(0, 2, 3, 1), crop=False)["last_hidden_state"].float()
        n = hidden.shape[1]
        side = int(round(n ** 0.5))
        prefix = 0 if side * side == n else 1
        side = int(round((n - prefix) ** 0.5))
        if side * side != n - prefix:
            raise RefAlignInputError(f"clip_vision: cannot find a square patch grid in {n} tokens")
        grid = hidden[:, prefix:].transpose(1, 2).reshape(hidden.shape[0], -1, side, side)
        grid = F.interpolate(grid, size=(gh, gw), mode="bilinear", align_corners=False)
        return grid.flatten(2).transpose(1, 2).cpu()


def default_backbone():
    if "efficientnet" not in _DEFAULT_BACKBONE:
        _DEFAULT_BACKBONE["efficientnet"] = load_vfm("efficientnet-lite0")
    return _DEFAULT_BACKBONE["efficientnet"]


def identity_outputs(frames, references=None, reference_images=None, clip_vision=None, faces: bool = False,
                     sample_frames: int = 32):
    """(overall, subject_1..4, report text, sheet `[1, H, W, 3]`, ui) for generated frames `[T, H, W, 3]`."""
    if references is not None and references.references:
        refs, masks = references.images, references.masks
    elif reference_images is not None:
        refs, masks = list(reference_images), None
    elif references is not None and references.encoded is not None:
        raise RefAlignInputError(f"references: {references.encoded.source or 'these'} are encoded references (RefAlign "
                                 "Load Encoded References), which carry no images, and the Identity Check compares "
                                 "images; connect the subject images to reference_images (or the references from "
                                 "Multi-Subject Reference or Save Encoded References)")
    else:
        raise RefAlignInputError("no references: connect references (REFALIGN_REFS) or reference_images")
    if len(refs) > MAX_SUBJECTS:
        raise RefAlignInputError(f"{len(refs)} references: at most {MAX_SUBJECTS} are supported")
    embedder = ClipVisionTokens(clip_vision) if clip_vision is not None else default_backbone()
    face_embedder = None
    if faces:
        from refalign_core.metrics.faces import FaceEmbedder
        face_embedder = FaceEmbedder()
    report, sheet = evaluate(refs, frames.cpu(), embedder, masks=masks,
                             settings=IdentitySettings(sample_frames=sample_frames),
                             backbone_name="clip_vision" if clip_vision is not None else "efficientnet-lite0",
                             face_embedder=face_embedder)
    sheet_tensor = torch.from_numpy(np.asarray(sheet).copy()).float().div(255)[None]
    scores = [s.mean for s in report.subjects] + [0.0] * (MAX_SUBJECTS - len(report.subjects))
    text = report.summary()
    ui = {"text": [text], "images": runtime.temp_image_output(sheet, "refalign_identity")}
    return (report.overall, *scores, text, sheet_tensor.to(runtime.intermediate_device())), ui


class RefAlignIdentityCheck(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        subjects = [io.Float.Output(display_name=f"subject_{k}", tooltip=f"Identity of subject {k} (0 when absent).")
                    for k in range(1, MAX_SUBJECTS + 1)]
        return io.Schema(
            node_id="RefAlignIdentityCheck", display_name="RefAlign Identity Check", category="RefAlign",
            description="Scores whether the generated frames keep each reference subject: identity per subject "
                        "(best matching region, per frame), multi-subject confusion, copy-paste of the reference, "
                        "optional face similarity, and motion. Uses the connected CLIP_VISION model, else an offline "
                        "EfficientNet.",
            is_output_node=True,
            inputs=[
                io.Image.Input("frames", tooltip="The generated video frames."),
                io.Boolean.Input("faces", default=False, tooltip="Also compare faces (dlib; needs the 'faces' "
                                                                 "extra)."),
                io.Int.Input("sample_frames", default=32, min=1, max=1024,
                             tooltip="Frames scored, sampled uniformly (OpenS2V uses 32)."),
                REFERENCES.Input("references", optional=True, tooltip="The references given to the sampler."),
                io.Image.Input("reference_images", optional=True,
                               tooltip="Or reference images as a batch, one per subject."),
                io.ClipVision.Input("clip_vision", optional=True, tooltip="Backbone for identity (e.g. DINOv2 via "
                                    "Load CLIP Vision); default: offline EfficientNet-Lite0."),
            ],
            outputs=[
                io.Float.Output(display_name="overall", tooltip="Mean identity over subjects (cosine, higher is "
                                                                "better)."),
                *subjects,
                io.String.Output(display_name="report", tooltip="The text report (also shown on the node)."),
                io.Image.Output(display_name="sheet", tooltip="Contact sheet: references, frames with each subject's "
                                                              "region, heat maps, flags."),
            ],
        )

    @classmethod
    def execute(cls, frames, faces, sample_frames, references=None, reference_images=None,
                clip_vision=None) -> io.NodeOutput:
        result, ui = identity_outputs(frames, references, reference_images, clip_vision, faces, sample_frames)
        return io.NodeOutput(*result, ui=ui)
