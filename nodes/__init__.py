"""ComfyUI nodes (RefAlign Loader, Multi-Subject Reference, R2V Sampler, Identity Check, Model Patch, Subject
Conditioning): thin adapters from ComfyUI types to `refalign_core` and ComfyUI's own machinery (`native.py`).
ComfyUI imports stay inside functions and are lazy."""

from .conditioning import RefAlignSubjectConditioning
from .identity import RefAlignIdentityCheck
from .loader import RefAlignLoader
from .model_patch import RefAlignModelPatch
from .references import RefAlignMultiSubjectReference
from .sampler import RefAlignR2VSampler

NODE_CLASS_MAPPINGS = {
    "RefAlignLoader": RefAlignLoader,
    "RefAlignMultiSubjectReference": RefAlignMultiSubjectReference,
    "RefAlignR2VSampler": RefAlignR2VSampler,
    "RefAlignIdentityCheck": RefAlignIdentityCheck,
    "RefAlignModelPatch": RefAlignModelPatch,
    "RefAlignSubjectConditioning": RefAlignSubjectConditioning,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "RefAlignLoader": "RefAlign Loader",
    "RefAlignMultiSubjectReference": "RefAlign Multi-Subject Reference",
    "RefAlignR2VSampler": "RefAlign R2V Sampler",
    "RefAlignIdentityCheck": "RefAlign Identity Check",
    "RefAlignModelPatch": "RefAlign Model Patch",
    "RefAlignSubjectConditioning": "RefAlign Subject Conditioning",
}
