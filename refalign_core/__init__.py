"""RefAlign core: the Wan2.1 DiT with the reference tail, checkpoint I/O, VAE / umT5 loading, reference
preprocessing and the R2V sampler. Imports nothing from ComfyUI."""

from .checkpoint import load_dit, save_dit
from .errors import RefAlignInputError
from .pipeline import GenerationResult, RefAlignPipeline, generate
from .references import Reference, encode_references, fit_on_white, prepare_references
from .sampler import SamplingCancelled, SamplingSettings, make_scheduler, sample_r2v, three_pass_guidance
from .text_encoder import WAN_NEGATIVE_PROMPT, encode_prompts, load_text_encoder
from .transformer_refalign import RefAlignTransformer3DModel, VideoOnlyCrossAttnProcessor
from .vae import decode_latents, encode_video, load_vae, save_vae

__version__ = "0.1.0"
__all__ = [
    "GenerationResult", "RefAlignInputError", "RefAlignPipeline", "RefAlignTransformer3DModel", "Reference",
    "SamplingCancelled", "SamplingSettings", "generate",
    "VideoOnlyCrossAttnProcessor", "WAN_NEGATIVE_PROMPT", "decode_latents", "encode_prompts", "encode_references",
    "encode_video", "fit_on_white", "load_dit", "load_text_encoder", "load_vae", "make_scheduler",
    "prepare_references", "sample_r2v", "save_dit", "save_vae", "three_pass_guidance",
]
