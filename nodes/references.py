"""RefAlign Multi-Subject Reference: 1–4 subject images (+ optional masks) -> REFALIGN_REFS and a preview."""

from dataclasses import dataclass, field

import torch
from comfy_api.latest import io

from refalign_core.errors import RefAlignInputError
from refalign_core.inference.reference_files import EncodedReferences
from refalign_core.inference.references import MAX_REFERENCES, RECOMMENDED_MAX_REFERENCES, Reference, prepare_references

REFERENCES = io.Custom("REFALIGN_REFS")  # a ReferenceSet


@dataclass
class ReferenceSet:
    """What flows along a REFALIGN_REFS link: the subjects (image `[H, W, C]` in [0, 1], optional mask, name),
    fitted at the sampler's size; and / or their latents encoded once (RefAlign Save / Load Encoded References: DiT
    space, fitted at one size), which the sampler and Subject Conditioning then use instead of encoding the images.
    A set loaded from a file has latents only (`references` empty)."""

    references: list[Reference] = field(default_factory=list)
    encoded: EncodedReferences | None = None

    @property
    def count(self) -> int:
        return len(self.references) or (self.encoded.count if self.encoded is not None else 0)

    def latents(self, width: int, height: int, what: str = "references") -> torch.Tensor | None:
        """The encoded latents `[1, C, K, height/8, width/8]` (DiT space), refused with one error when they were
        fitted at another size; None when the set holds images only."""
        if self.encoded is None:
            return None
        self.encoded.check_size(width, height, what)
        return self.encoded.latents

    @property
    def images(self) -> list[torch.Tensor]:
        return [r.image for r in self.references]

    @property
    def masks(self) -> list[torch.Tensor | None]:
        return [r.mask for r in self.references]

    def fitted(self, width: int, height: int) -> torch.Tensor:
        """`[K, 3, height, width]` aspect-fitted on white (masked backgrounds whitened)."""
        if not self.references and self.encoded is not None:
            raise RefAlignInputError(f"references: {self.encoded.source or 'these references'} holds encoded "
                                     "references only, no images (RefAlign Load Encoded References); connect the "
                                     "subject images through RefAlign Multi-Subject Reference for this")
        return prepare_references(self.references, width, height, max_references=MAX_REFERENCES)


def collect_references(images, masks) -> ReferenceSet:
    subjects = []
    for slot, (batch, mask) in enumerate(zip(images, masks), start=1):
        if batch is None:
            if mask is not None:
                raise RefAlignInputError(f"mask_{slot} is connected but image_{slot} is not")
            continue
        if mask is not None:
            mask = mask if mask.ndim == 3 else mask[None]
            if mask.shape[0] not in (1, batch.shape[0]) or tuple(mask.shape[1:]) != tuple(batch.shape[1:3]):
                raise RefAlignInputError(
                    f"mask_{slot} has shape {tuple(mask.shape)}; expected [1 or {batch.shape[0]}, "
                    f"{batch.shape[1]}, {batch.shape[2]}] to match image_{slot}")
        for i, image in enumerate(batch):
            subjects.append(Reference(image, None if mask is None else mask[min(i, mask.shape[0] - 1)],
                                      name=f"subject {len(subjects) + 1}"))
    if not subjects:
        raise RefAlignInputError("no references: connect at least one subject image (image_1 … image_4)")
    if len(subjects) > MAX_REFERENCES:
        raise RefAlignInputError(f"{len(subjects)} references: at most {MAX_REFERENCES} are supported (≤ 3 "
                                 "recommended); image inputs that are batches count one reference per image")
    return ReferenceSet(subjects)


class RefAlignMultiSubjectReference(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        slots = []
        for k in range(1, MAX_REFERENCES + 1):
            slots += [io.Image.Input(f"image_{k}", optional=True,
                                     tooltip=f"Subject {k} (a batch adds one subject per image)."),
                      io.Mask.Input(f"mask_{k}", optional=True, tooltip=f"Optional mask for image_{k}: white = "
                                    "subject; the rest becomes white and the image is cropped to the subject.")]
        return io.Schema(
            node_id="RefAlignMultiSubjectReference", display_name="RefAlign Multi-Subject Reference",
            category="RefAlign",
            description="Collects 1–4 subject references (people, objects, scenes). Each is fitted into the video "
                        "size keeping its aspect and padded with white — never cropped; a mask turns its background "
                        f"white. Describe every subject in the prompt. More than {RECOMMENDED_MAX_REFERENCES} runs, "
                        "with a warning: the released models were trained with at most that many.",
            inputs=[
                io.Int.Input("width", default=832, min=16, max=4096, step=16,
                             tooltip="Preview width (the sampler fits the references at its own size)."),
                io.Int.Input("height", default=480, min=16, max=4096, step=16,
                             tooltip="Preview height, a multiple of 16."),
                *slots,
            ],
            outputs=[
                REFERENCES.Output(display_name="references", tooltip="The subject references for the R2V Sampler "
                                                                     "and the Identity Check."),
                io.Image.Output(display_name="preview", tooltip="The references as the model sees them (fitted on "
                                                                "white at width × height)."),
            ],
        )

    @classmethod
    def execute(cls, width, height, **inputs) -> io.NodeOutput:
        refs = collect_references([inputs.get(f"image_{k}") for k in range(1, MAX_REFERENCES + 1)],
                                  [inputs.get(f"mask_{k}") for k in range(1, MAX_REFERENCES + 1)])
        return io.NodeOutput(refs, refs.fitted(width, height).permute(0, 2, 3, 1).contiguous())
