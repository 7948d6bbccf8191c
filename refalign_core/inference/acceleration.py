"""Speed options of the core DiT: attention backend (diffusers' attention dispatch) and regional compile.

Only backends that run from installed packages are offered (no kernel-hub backends: there is no network at run
time). A backend whose package or device is missing falls back to native PyTorch SDPA with one warning."""

import logging

import torch

from ..errors import RefAlignInputError

logger = logging.getLogger(__name__)

# our name -> (diffusers AttentionBackendName value, package to install, needs CUDA)
ATTENTION_BACKENDS = {
    "native": ("native", None, False),
    "cudnn": ("_native_cudnn", None, True),
    "flash": ("flash", "flash-attn", True),
    "flash3": ("_flash_3", "flash-attn 3 (flash_attn_interface)", True),
    "sage": ("sage", "sageattention", True),
    "xformers": ("xformers", "xformers", True),
}


def attention_backend_available(name: str, device) -> tuple[bool, str]:
    """(usable, why not) for backend `name` on `device`."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _check_attention_backend_requirements

    if name not in ATTENTION_BACKENDS:
        raise RefAlignInputError(f"attention backend must be one of {list(ATTENTION_BACKENDS)}, got {name!r}")
    backend, package, needs_cuda = ATTENTION_BACKENDS[name]
    if needs_cuda and torch.device(device).type != "cuda":
        return False, f"needs a CUDA GPU (the DiT is on {device})"
    try:
        _check_attention_backend_requirements(AttentionBackendName(backend))
    except (RuntimeError, ImportError) as e:
        return False, f"needs {package}: {e}"
    return True, ""


def set_attention_backend(dit, name: str, device=None) -> str:
    """Route the DiT's attention through backend `name` for running on `device` (default: where the DiT is);
    returns the backend in use ("native" after a fallback)."""
    ok, why = attention_backend_available(name, device or dit.patch_embedding.weight.device)
    if not ok:
        logger.warning("attention backend %r is not usable here (%s); using native (PyTorch SDPA)", name, why)
        name = "native"
    backend = ATTENTION_BACKENDS[name][0]
    diffusers_logger = logging.getLogger("diffusers.models.modeling_utils")
    level = diffusers_logger.level
    diffusers_logger.setLevel(logging.ERROR)  # its "experimental feature" warning on every call
    try:
        dit.set_attention_backend(backend)
    finally:
        diffusers_logger.setLevel(level)
    dit._refalign_attention_backend = name
    return name


def attention_backend(dit) -> str:
    return getattr(dit, "_refalign_attention_backend", "native")


def compile_blocks(dit, fullgraph: bool = True) -> None:
    """Regional compile: `torch.compile` on each repeated Wan block (diffusers' `compile_repeated_blocks`), compiled
    once and reused by all 30/40 blocks, so the first call costs seconds instead of minutes."""
    dit.compile_repeated_blocks(fullgraph=fullgraph, dynamic=False)
