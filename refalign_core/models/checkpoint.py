"""DiT checkpoint I/O: original Wan2.1 naming (RefAlign release, Wan2.1-T2V), ComfyUI's `model.diffusion_model.`
prefix, and diffusers naming. The config is inferred from tensor shapes; nothing is fetched from a hub."""

import json
import logging
import math
import os
import re

import torch
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

from ..errors import RefAlignInputError
from .safetensors_io import read_safetensors, read_safetensors_shapes, write_safetensors
from .transformer_refalign import RefAlignTransformer3DModel

logger = logging.getLogger(__name__)

COMFY_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
CONFIG_KEYS = ("head.head.weight", "text_embedding.0.weight", "time_embedding.0.weight", "blocks.0.ffn.0.weight")
CONFIG_METADATA_KEY = "refalign.dit_config"
# weight storage dtypes by the names the CLI, the nodes and the training config use (fp8: storage only)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp8_e4m3fn": torch.float8_e4m3fn}
COMPUTE_DTYPES = ("fp32", "bf16", "fp16")  # the DTYPES a model computes in (fp8 is for storage only)
WAN_HEADS = {1536: 12, 5120: 40}  # released Wan2.1 widths -> heads (head dim 128), for files without our metadata
TRAINING_ONLY = re.compile(r"^blocks\.\d+\.input_mlp\.")  # official trainer's projectors

_TOP_LEVEL_TO_ORIGINAL = {
    "condition_embedder.time_embedder.linear_1": "time_embedding.0",
    "condition_embedder.time_embedder.linear_2": "time_embedding.2",
    "condition_embedder.text_embedder.linear_1": "text_embedding.0",
    "condition_embedder.text_embedder.linear_2": "text_embedding.2",
    "condition_embedder.time_proj": "time_projection.1",
    "proj_out": "head.head",
    "scale_shift_table": "head.modulation",
    "patch_embedding": "patch_embedding",
}
_BLOCK_TO_ORIGINAL = {
    "attn1.to_q": "self_attn.q", "attn1.to_k": "self_attn.k", "attn1.to_v": "self_attn.v",
    "attn1.to_out.0": "self_attn.o", "attn1.norm_q": "self_attn.norm_q", "attn1.norm_k": "self_attn.norm_k",
    "attn2.to_q": "cross_attn.q", "attn2.to_k": "cross_attn.k", "attn2.to_v": "cross_attn.v",
    "attn2.to_out.0": "cross_attn.o", "attn2.norm_q": "cross_attn.norm_q", "attn2.norm_k": "cross_attn.norm_k",
    "norm2": "norm3",  # diffusers' norm2 is the affine norm before cross-attention, Wan's norm3
    "ffn.net.0.proj": "ffn.0", "ffn.net.2": "ffn.2",
    "scale_shift_table": "modulation",
}


def diffusers_to_original_key(key: str) -> str:
    """diffusers `WanTransformer3DModel` key -> original Wan2.1 key (T2V key set)."""
    match = re.match(r"^blocks\.(\d+)\.(.+?)(\.weight|\.bias)?$", key)
    if match:
        index, module, leaf = match.group(1), match.group(2), match.group(3) or ""
        if module in _BLOCK_TO_ORIGINAL:
            return f"blocks.{index}.{_BLOCK_TO_ORIGINAL[module]}{leaf}"
    else:
        module, _, leaf = key.rpartition(".") if key.endswith((".weight", ".bias")) else (key, "", "")
        if module in _TOP_LEVEL_TO_ORIGINAL:
            return _TOP_LEVEL_TO_ORIGINAL[module] + (f".{leaf}" if leaf else "")
    raise KeyError(f"no original Wan2.1 name for diffusers key {key!r}")


def _strip_prefix(state_dict: dict) -> dict:
    for prefix in COMFY_PREFIXES:
        if any(k.startswith(prefix) for k in state_dict):
            return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state_dict.items()}
    return state_dict


def _is_diffusers_naming(keys) -> bool:
    return any(k.startswith("condition_embedder.") or ".attn1." in k for k in keys)


def _is_fp8_scale_key(key: str) -> bool:
    return key == "scaled_fp8" or key.endswith((".scale_weight", ".scale_input"))


def _dequantize_scaled_fp8(state_dict: dict) -> dict:
    """ComfyUI's `*_fp8_scaled` files store weight·(1/scale) in fp8 plus `*.scale_weight`; undo it in fp32."""
    if "scaled_fp8" not in state_dict:
        return state_dict
    out = {}
    for key, value in state_dict.items():
        if _is_fp8_scale_key(key):
            continue
        scale = state_dict.get(key[: -len("weight")] + "scale_weight") if key.endswith(".weight") else None
        out[key] = value.float() * scale.float() if scale is not None else value
    return out


def _describe_unknown(keys, path) -> str:
    sample = sorted(keys)[:6]
    return f"{path} is not a Wan2.1 DiT checkpoint (no head.modulation / patch_embedding); first keys: {sample}"


def to_original_naming(state_dict: dict, path="checkpoint", dequantize: bool = True) -> dict:
    """Any supported naming -> original Wan2.1 naming, refusing I2V / VACE / non-Wan checkpoints. `dequantize`:
    turn ComfyUI `fp8_scaled` weights into plain fp32 ones (else they stay, with their scale tensors)."""
    state_dict = _strip_prefix(dict(state_dict))
    if dequantize:
        state_dict = _dequantize_scaled_fp8(state_dict)
    keys = {k for k in state_dict if not _is_fp8_scale_key(k)}
    if _is_diffusers_naming(keys):
        if any(k.startswith("vace_") for k in keys):
            raise RefAlignInputError(f"{path} is a Wan VACE checkpoint; RefAlign needs a Wan2.1 T2V DiT")
        if any("add_k_proj" in k or k.startswith("condition_embedder.image_embedder") for k in keys):
            raise RefAlignInputError(f"{path} is a Wan I2V checkpoint; RefAlign needs a Wan2.1 T2V DiT")
        try:
            state_dict = {diffusers_to_original_key(k): v for k, v in state_dict.items()}
        except KeyError as e:
            raise RefAlignInputError(f"{path}: unexpected key in a diffusers-named Wan DiT: {e}") from e
        keys = set(state_dict)
    if any(k.startswith(("vace_blocks.", "vace_patch_embedding")) for k in keys):
        raise RefAlignInputError(f"{path} is a Wan VACE checkpoint; RefAlign needs a Wan2.1 T2V DiT")
    if "img_emb.proj.0.weight" in keys or any(".k_img." in k for k in keys):
        raise RefAlignInputError(f"{path} is a Wan I2V checkpoint (img_emb / k_img keys); RefAlign needs a T2V DiT")
    if "head.modulation" not in keys or "patch_embedding.weight" not in keys:
        raise RefAlignInputError(_describe_unknown(keys, path))
    dropped = sorted(k for k in keys if TRAINING_ONLY.match(k))
    if dropped:
        logger.info("%s: ignoring %d training-only projector tensors (input_mlp)", path, len(dropped))
    return {k: v for k, v in state_dict.items() if not TRAINING_ONLY.match(k)}


def infer_dit_config(shapes: dict[str, tuple], metadata: dict | None = None, path="checkpoint") -> dict:
    """`WanTransformer3DModel` config from original-named tensor shapes (values may be meta tensors or sizes)."""
    shapes = {k: tuple(v.shape) if hasattr(v, "shape") else tuple(v) for k, v in shapes.items()}
    missing = [k for k in CONFIG_KEYS if k not in shapes]
    if missing:
        raise RefAlignInputError(f"{path} does not match a Wan2.1 T2V DiT: {len(missing)} missing keys: {missing}")
    dim, in_channels, *patch = shapes["patch_embedding.weight"]
    if in_channels != 16:
        kind = {36: "an I2V / FLF2V", 48: "a Wan2.2 TI2V-5B"}.get(in_channels, f"an in_dim={in_channels}")
        raise RefAlignInputError(f"{path} is {kind} DiT (patch_embedding in_dim {in_channels}); RefAlign needs 16")
    layers = {int(m.group(1)) for k in shapes if (m := re.match(r"^blocks\.(\d+)\.", k))}
    if not layers or layers != set(range(max(layers) + 1)):
        raise RefAlignInputError(f"{path}: transformer blocks are not numbered 0..N-1 (found {sorted(layers)[:8]}...)")
    try:
        stored = json.loads((metadata or {}).get(CONFIG_METADATA_KEY, "{}"))
        num_heads = stored.get("num_attention_heads")
    except (ValueError, AttributeError) as e:
        raise RefAlignInputError(f"{path}: its '{CONFIG_METADATA_KEY}' metadata is not a JSON object: {e}") from e
    if num_heads is None:
        # the weights do not tell the head count (qk-norms span the whole width); the released Wan2.1 widths do
        if dim not in WAN_HEADS:
            raise RefAlignInputError(
                f"{path}: a {dim}-wide DiT could have several numbers of attention heads and the file has no "
                f"'{CONFIG_METADATA_KEY}' metadata saying which (known without it: the Wan2.1 widths "
                f"{sorted(WAN_HEADS)}); save it with refalign_core.save_dit, which records the config")
        num_heads = WAN_HEADS[dim]
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1 or dim % num_heads:
        raise RefAlignInputError(f"{path}: num_attention_heads {num_heads!r} does not divide the width {dim}")
    return {
        "patch_size": tuple(patch),
        "num_attention_heads": num_heads,
        "attention_head_dim": dim // num_heads,
        "in_channels": in_channels,
        "out_channels": shapes["head.head.weight"][0] // math.prod(patch),
        "text_dim": shapes["text_embedding.0.weight"][1],
        "freq_dim": shapes["time_embedding.0.weight"][1],
        "ffn_dim": shapes["blocks.0.ffn.0.weight"][0],
        "num_layers": max(layers) + 1,
        "cross_attn_norm": True,
        "eps": stored.get("eps", 1e-6),
    }


def expected_original_shapes(config: dict) -> dict[str, tuple]:
    """Original-named key -> shape for a config, built on the meta device (no memory)."""
    with torch.device("meta"):
        model = RefAlignTransformer3DModel(**config)
    return {diffusers_to_original_key(k): tuple(v.shape) for k, v in model.state_dict().items()}


def _check_keys(shapes: dict[str, tuple], expected: dict, path) -> None:
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    wrong = sorted(k for k in set(expected) & set(shapes) if shapes[k] != expected[k])
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys: {missing[:10]}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {unexpected[:10]}")
    if wrong:
        problems.append(f"wrong shapes: {[(k, shapes[k], expected[k]) for k in wrong[:5]]}")
    if problems:
        raise RefAlignInputError(f"{path} does not match a Wan2.1 T2V DiT: " + "; ".join(problems))


def keeps_fp32(model, name: str) -> bool:
    """Whether parameter `name` belongs to one of the model's `_keep_in_fp32_modules` (time embedder, modulation
    tables, norms: what diffusers keeps in fp32 under low-precision storage)."""
    return any(part in model._keep_in_fp32_modules for part in name.split("."))


def apply_layerwise_casting(model, weight_dtype, compute_dtype) -> None:
    """Keep block/head weights in `weight_dtype` and upcast per layer at forward (diffusers' layerwise casting);
    whatever that hook leaves out (embeddings, norms, modulation tables, proj_out) is cast to `compute_dtype`, except
    `_keep_in_fp32_modules`, which stay fp32."""
    skip = tuple(model._skip_layerwise_casting_patterns) + tuple(model._keep_in_fp32_modules)
    model.enable_layerwise_casting(storage_dtype=weight_dtype, compute_dtype=compute_dtype,
                                   skip_modules_pattern=skip)
    for module_name, module in model.named_modules():
        registry = getattr(module, "_diffusers_hook", None)
        if registry is None or registry.get_hook("layerwise_casting") is None:
            for name, param in module.named_parameters(recurse=False):
                if not keeps_fp32(model, f"{module_name}.{name}"):
                    param.data = param.data.to(compute_dtype)


def validated_original(state_dict: dict, metadata: dict | None = None, path="checkpoint",
                       dequantize: bool = True) -> tuple[dict, dict]:
    """(original-named state dict, `WanTransformer3DModel` config) of a Wan2.1 T2V DiT in any supported naming,
    its key set and shapes checked (by shape only, so nothing is dequantized when `dequantize` is False)."""
    original = to_original_naming(state_dict, path, dequantize)
    shapes = {k: tuple(v.shape) for k, v in original.items() if not _is_fp8_scale_key(k)}
    config = infer_dit_config(shapes, metadata, path)
    _check_keys(shapes, expected_original_shapes(config), path)
    return original, config


def dit_from_state_dict(state_dict: dict, metadata: dict | None = None, *, compute_dtype=torch.float32,
                        weight_dtype=None, device="cpu", path="checkpoint") -> RefAlignTransformer3DModel:
    """Build a `RefAlignTransformer3DModel` from a state dict in any supported naming."""
    weight_dtype = weight_dtype or compute_dtype
    original, config = validated_original(state_dict, metadata, path)
    converted = convert_wan_transformer_to_diffusers(original)
    with torch.device("meta"):
        model = RefAlignTransformer3DModel(**config)
    low_precision = weight_dtype != torch.float32 or compute_dtype != torch.float32
    converted = {k: v.to(device=device, dtype=torch.float32 if low_precision and keeps_fp32(model, k)
                         else weight_dtype) for k, v in converted.items()}
    model.load_state_dict(converted, strict=True, assign=True)
    # non-persistent RoPE tables were created on the meta device: rebuild them for real
    model.rope = WanRotaryPosEmbed(config["attention_head_dim"], config["patch_size"], model.config.rope_max_seq_len)
    model.rope.to(device)
    if weight_dtype != compute_dtype:
        apply_layerwise_casting(model, weight_dtype, compute_dtype)
    return model.eval().requires_grad_(False)


def load_dit(path: str | os.PathLike, *, compute_dtype=torch.float32, weight_dtype=None,
             device="cpu") -> RefAlignTransformer3DModel:
    """Load a Wan2.1 T2V / RefAlign DiT from a .safetensors file, a sharded index, or a folder holding one.

    weight_dtype: how weights are kept in memory (fp32/bf16/fp16/float8_e4m3fn); None = compute_dtype.
    compute_dtype: the dtype the forward runs in (fp32 on CPU)."""
    state_dict, metadata = read_safetensors(path, "DiT checkpoint")
    return dit_from_state_dict(state_dict, metadata, compute_dtype=compute_dtype, weight_dtype=weight_dtype,
                               device=device, path=str(path))


def read_dit_header(path: str | os.PathLike) -> tuple[dict, int]:
    """(full `RefAlignTransformer3DModel` config, parameter count) of a DiT file from its safetensors header alone,
    its keys and shapes checked as `load_dit` checks them: what a run needs is known before any weight is read."""
    shapes, metadata = read_safetensors_shapes(path, "DiT checkpoint")
    original, config = validated_original(shapes, metadata, str(path), dequantize=False)
    with torch.device("meta"):
        model = RefAlignTransformer3DModel(**config)
    count = sum(math.prod(v.shape) for k, v in original.items() if not _is_fp8_scale_key(k))
    return dict(model.config), count


def dit_state_dict_original(model: RefAlignTransformer3DModel, dtype=None) -> dict[str, torch.Tensor]:
    """The model's weights in original Wan2.1 naming (the release key set)."""
    return {
        diffusers_to_original_key(k): (v.to(dtype) if dtype is not None else v)
        for k, v in model.state_dict().items()
    }


def save_dit(model: RefAlignTransformer3DModel, path: str | os.PathLike, dtype=None) -> None:
    """Save in original Wan2.1 naming (loadable by ComfyUI's diffusion-model loader); heads/eps in metadata."""
    config = {"num_attention_heads": model.config.num_attention_heads, "eps": model.config.eps}
    write_safetensors(dit_state_dict_original(model, dtype), path, {CONFIG_METADATA_KEY: json.dumps(config)})
