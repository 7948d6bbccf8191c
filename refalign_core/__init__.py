"""RefAlign core, imports nothing from ComfyUI. Its folders, each importing only those listed before it:

* `models/`: the Wan2.1 DiT with the reference tail, checkpoint and weight I/O, VAE, umT5, LoRA, the frozen VFMs;
* `inference/`: references, the R2V sampler, `generate` and `RefAlignPipeline`, caches, speed options, bundles;
* `metrics/`: the identity check, its contact sheet, face mode and the evaluation over many cases;
* `training/`: the RefAlign training loop and its data; `toy/`: the toy world and the embedded model.

`errors`, `files`, `paths`, `registry` and `validation` serve them all; `python -m refalign_core` is the command line."""

from . import deprecated
from .errors import RefAlignInputError
from .inference.extension import Extension
from .inference.pipeline import GenerationResult, PipelineSpec, RefAlignPipeline, generate, load_pipeline
from .inference.references import Reference, encode_references, fit_on_white, prepare_references
from .inference.sampler import SamplingCancelled, SamplingSettings, make_scheduler, sample_r2v, three_pass_guidance
from .models.checkpoint import load_dit, save_dit
from .models.text_encoder import WAN_NEGATIVE_PROMPT, encode_prompts, load_text_encoder
from .models.transformer_refalign import RefAlignTransformer3DModel, VideoOnlyCrossAttnProcessor
from .models.vae import decode_latents, encode_video, load_vae, save_vae

deprecated.install()

__version__ = "0.2.0"
__all__ = [
    "Extension", "GenerationResult", "PipelineSpec", "RefAlignInputError", "RefAlignPipeline", "RefAlignTransformer3DModel",
    "Reference", "SamplingCancelled", "SamplingSettings", "generate", "load_pipeline",
    "VideoOnlyCrossAttnProcessor", "WAN_NEGATIVE_PROMPT", "decode_latents", "encode_prompts", "encode_references",
    "encode_video", "fit_on_white", "load_dit", "load_text_encoder", "load_vae", "make_scheduler",
    "prepare_references", "sample_r2v", "save_dit", "save_vae", "three_pass_guidance",
]
