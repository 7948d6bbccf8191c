"""ComfyUI nodes (V3 schema): RefAlign Loader, Multi-Subject Reference, R2V Sampler and Identity Check, the
pieces of the step-by-step wiring (Model Patch, Subject Conditioning, Guider), Segment Latent and Join Segments
(extension), Save / Load Encoded References, plus the toy's Example Image. Thin adapters from ComfyUI types onto
ComfyUI's own MODEL, CLIP and VAE (`native.py`) and `refalign_core`. ComfyUI loads this package through the pack's
`comfy_entrypoint`, so nothing here is imported outside ComfyUI unless asked for."""

from comfy_api.latest import ComfyExtension

from .conditioning import RefAlignSubjectConditioning
from .encoded_references import RefAlignLoadEncodedReferences, RefAlignSaveEncodedReferences
from .examples import RefAlignExampleImage
from .extension import RefAlignJoinSegments, RefAlignSegmentLatent
from .guider import RefAlignGuider
from .identity import RefAlignIdentityCheck
from .loader import RefAlignLoader
from .model_patch import RefAlignModelPatch
from .references import RefAlignMultiSubjectReference
from .sampler import RefAlignR2VSampler

NODES = [RefAlignLoader, RefAlignMultiSubjectReference, RefAlignR2VSampler, RefAlignIdentityCheck,
         RefAlignModelPatch, RefAlignSubjectConditioning, RefAlignGuider, RefAlignExampleImage,
         RefAlignSaveEncodedReferences, RefAlignLoadEncodedReferences, RefAlignSegmentLatent, RefAlignJoinSegments]


class RefAlignExtension(ComfyExtension):
    async def get_node_list(self) -> list:
        return list(NODES)
