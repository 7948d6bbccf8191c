"""ComfyUI nodes: RefAlign Loader, Multi-Subject Reference, R2V Sampler and Identity Check, and the pieces of the
modular wiring (Model Patch, Subject Conditioning, Guider). Thin adapters from ComfyUI types onto ComfyUI's own MODEL,
CLIP and VAE (`native.py`) and `refalign_core`. ComfyUI imports stay inside functions and are lazy."""

from .conditioning import RefAlignSubjectConditioning
from .examples import RefAlignExampleImage
from .guider import RefAlignGuider
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
    "RefAlignGuider": RefAlignGuider,
    "RefAlignExampleImage": RefAlignExampleImage,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "RefAlignLoader": "RefAlign Loader",
    "RefAlignMultiSubjectReference": "RefAlign Multi-Subject Reference",
    "RefAlignR2VSampler": "RefAlign R2V Sampler",
    "RefAlignIdentityCheck": "RefAlign Identity Check",
    "RefAlignModelPatch": "RefAlign Model Patch",
    "RefAlignSubjectConditioning": "RefAlign Subject Conditioning",
    "RefAlignGuider": "RefAlign Guider",
    "RefAlignExampleImage": "RefAlign Example Image",
}
