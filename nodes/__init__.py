"""ComfyUI nodes (RefAlign Loader, Multi-Subject Reference, R2V Sampler, Identity Check): thin adapters from
ComfyUI types to `refalign_core`. ComfyUI imports stay inside `runtime.py` and are lazy."""

from .identity import RefAlignIdentityCheck
from .loader import RefAlignLoader
from .references import RefAlignMultiSubjectReference
from .sampler import RefAlignR2VSampler

NODE_CLASS_MAPPINGS = {
    "RefAlignLoader": RefAlignLoader,
    "RefAlignMultiSubjectReference": RefAlignMultiSubjectReference,
    "RefAlignR2VSampler": RefAlignR2VSampler,
    "RefAlignIdentityCheck": RefAlignIdentityCheck,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "RefAlignLoader": "RefAlign Loader",
    "RefAlignMultiSubjectReference": "RefAlign Multi-Subject Reference",
    "RefAlignR2VSampler": "RefAlign R2V Sampler",
    "RefAlignIdentityCheck": "RefAlign Identity Check",
}
