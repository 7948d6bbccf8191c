"""RefAlign Multi-Subject Reference: 1–4 subject images (+ optional masks) -> REFALIGN_REFS and a preview."""

from dataclasses import dataclass, field

import torch

from ..refalign_core.errors import RefAlignInputError
from ..refalign_core.references import MAX_REFERENCES, Reference, prepare_references


@dataclass
class ReferenceSet:
    """What flows along a REFALIGN_REFS link: the subjects (image `[H, W, C]` in [0, 1], optional mask, name),
    fitted at the sampler's size."""

    references: list[Reference] = field(default_factory=list)

    @property
    def images(self) -> list[torch.Tensor]:
        return [r.image for r in self.references]

    @property
    def masks(self) -> list[torch.Tensor | None]:
        return [r.mask for r in self.references]

    def fitted(self, width: int, height: int) -> torch.Tensor:
        """`[K, 3, height, width]` aspect-fitted on white (masked backgrounds whitened)."""
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


class RefAlignMultiSubjectReference:
    DESCRIPTION = ("Collects 1–4 subject references (people, objects, scenes). Each is fitted into the video size "
                   "keeping its aspect and padded with white — never cropped; a mask turns its background white. "
                   "Describe every subject in the prompt.")
    CATEGORY = "RefAlign"
    FUNCTION = "collect"
    RETURN_TYPES = ("REFALIGN_REFS", "IMAGE")
    RETURN_NAMES = ("references", "preview")
    OUTPUT_TOOLTIPS = ("The subject references for the R2V Sampler and the Identity Check.",
                       "The references as the model sees them (fitted on white at width × height).")

    @classmethod
    def INPUT_TYPES(cls):
        optional = {}
        for k in range(1, MAX_REFERENCES + 1):
            optional[f"image_{k}"] = ("IMAGE", {"tooltip": f"Subject {k} (a batch adds one subject per image)."})
            optional[f"mask_{k}"] = ("MASK", {"tooltip": f"Optional mask for image_{k}: white = subject; the rest "
                                                         "becomes white and the image is cropped to the subject."})
        return {"required": {
            "width": ("INT", {"default": 832, "min": 16, "max": 4096, "step": 16,
                              "tooltip": "Preview width (the sampler fits the references at its own size)."}),
            "height": ("INT", {"default": 480, "min": 16, "max": 4096, "step": 16,
                               "tooltip": "Preview height, a multiple of 16."}),
        }, "optional": optional}

    def collect(self, width, height, **inputs):
        refs = collect_references([inputs.get(f"image_{k}") for k in range(1, MAX_REFERENCES + 1)],
                                  [inputs.get(f"mask_{k}") for k in range(1, MAX_REFERENCES + 1)])
        preview = refs.fitted(width, height).permute(0, 2, 3, 1).contiguous()
        return (refs, preview)
