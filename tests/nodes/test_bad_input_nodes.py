"""Bad input to the ComfyUI nodes (stand-ins for ComfyUI's runtime): one clear error each, before any output
(`bad_input.py`)."""

import math

import torch

from refalign_core.errors import RefAlignInputError

from bad_input import Case, api, node, table_test

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


test_bad_input_is_one_clear_error_before_any_output = table_test(CASES, 8)
