"""Bad input to the ComfyUI nodes (stand-ins for ComfyUI's runtime): one clear error each, before any output
(`bad_input.py`)."""

import math
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F

from refalign_core.errors import RefAlignInputError
from refalign_core.inference.reference_files import EncodedReferences

from bad_input import Case, api, node, table_test
from pack import load_pack, pack_nodes

class FakeVAE:
    """What the nodes call of a ComfyUI VAE: `encode` of pixels `[1, H, W, 3]` -> `[1, 16, 1, H/8, W/8]`."""

    def encode(self, pixels):
        return F.avg_pool2d(pixels.permute(0, 3, 1, 2), 8).repeat(1, 6, 1, 1)[:, :16, None]


def subjects(out: Path):
    return node(out, "RefAlignMultiSubjectReference", 64, 64, image_1=torch.rand(1, 32, 32, 3))[0]


def encoded_only():
    """A REFALIGN_REFS as RefAlign Load Encoded References gives it: latents, no images."""
    pack = load_pack()
    pack_nodes(pack)
    return pack.nodes.references.ReferenceSet([], EncodedReferences(torch.zeros(1, 16, 1, 8, 8),
                                                                    source="refs_00001_.safetensors"))


def in_reference_folder(inputs: Path, out: Path, name: str) -> str:
    """`name` from the inputs copied into the stand-in ComfyUI's models/refalign_references (beside `out`)."""
    folder = out.parent / "comfy" / "models" / "refalign_references"
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(inputs / name, folder / name)
    return name


CASES = [
    # ComfyUI nodes (stand-ins for ComfyUI's runtime; the pack shares the core's RefAlignInputError)
    Case("node Loader unknown model", api(lambda i, o: node(o, "RefAlignLoader", "nope.safetensors",
                                                             "default")), RefAlignInputError, "unet_name: nope"),
    Case("node Loader weight dtype", api(lambda i, o: node(o, "RefAlignLoader", "nope.safetensors",
                                                            "fp4")), RefAlignInputError, "weight_dtype"),
    Case("node references NaN image", api(lambda i, o: node(o, "RefAlignMultiSubjectReference", 64, 64,
                                                            image_1=torch.full((1, 32, 32, 3), math.nan))),
         RefAlignInputError, "NaN"),
    Case("node references none", api(lambda i, o: node(o, "RefAlignMultiSubjectReference", 64, 64)),
         RefAlignInputError, "no references"),
    Case("node references size", api(lambda i, o: node(o, "RefAlignMultiSubjectReference", 65, 64,
                                                       image_1=torch.rand(1, 32, 32, 3))), RefAlignInputError,
         "multiples of 16"),
    Case("node references five", api(lambda i, o: node(o, "RefAlignMultiSubjectReference", 64, 64,
                                                       image_1=torch.rand(5, 32, 32, 3))), RefAlignInputError,
         "at most 4"),
    Case("node identity NaN frames", api(lambda i, o: node(o, "RefAlignIdentityCheck",
                                                           torch.full((3, 32, 32, 3), math.nan), False, 8,
                                                           reference_images=torch.rand(1, 32, 32, 3))),
         RefAlignInputError, "NaN"),
    Case("node save encoded references without a VAE", api(lambda i, o: node(
        o, "RefAlignSaveEncodedReferences", None, subjects(o), 64, 64, "refs")), RefAlignInputError, "vae: no VAE"),
    Case("node save encoded references outside the folder", api(lambda i, o: node(
        o, "RefAlignSaveEncodedReferences", FakeVAE(), subjects(o), 64, 64, "../../refs")), RefAlignInputError,
         "filename_prefix: '../../refs' must be a file name"),
    Case("node save encoded references twice", api(lambda i, o: node(
        o, "RefAlignSaveEncodedReferences", FakeVAE(), encoded_only(), 64, 64, "refs")), RefAlignInputError,
         "holds encoded references only, no images"),
    Case("node load encoded references missing", api(lambda i, o: node(
        o, "RefAlignLoadEncodedReferences", "nope.safetensors", FakeVAE(), 128, 128)), RefAlignInputError,
         "encoded_references: 'nope.safetensors' is not a file in models/refalign_references"),
    Case("node load encoded references from another VAE", api(lambda i, o: node(
        o, "RefAlignLoadEncodedReferences", in_reference_folder(i, o, "other_vae_refs.safetensors"), FakeVAE(), 128,
        128)), RefAlignInputError, "other_vae_refs.safetensors: the references were encoded with another VAE"),
    Case("node load encoded references of another size", api(lambda i, o: node(
        o, "RefAlignLoadEncodedReferences", in_reference_folder(i, o, "small_size_refs.safetensors"), FakeVAE(), 128,
        128)), RefAlignInputError, "fitted at 64x64, but this run is 128x128"),
    Case("node identity of encoded references", api(lambda i, o: node(
        o, "RefAlignIdentityCheck", torch.rand(3, 32, 32, 3), False, 8, references=encoded_only())),
         RefAlignInputError, "carry no images"),
    Case("node identity without references", api(lambda i, o: node(o, "RefAlignIdentityCheck",
                                                                   torch.rand(3, 32, 32, 3), False, 8)),
         RefAlignInputError, "no references"),
    Case("node sampler image-guidance window reversed",
         api(lambda i, o: node(o, "RefAlignR2VSampler", None, None, None, None, None, 64, 64, 5, 4, 5.0, 5.0, 7.5, 0,
                               "euler", "zeros_per_reference", image_guidance_start=0.8, image_guidance_end=0.2)),
         RefAlignInputError, "image_guidance_start"),
    Case("node guider reference strength 3",
         api(lambda i, o: node(o, "RefAlignGuider", None, None, None, None, 5.0, 7.5, reference_strength=3.0)),
         RefAlignInputError, "reference_strength"),
]


test_bad_input_is_one_clear_error_before_any_output = table_test(CASES, 15)
