"""The models of a training run: the frozen encoders (VAE, text encoder, VFM), the DiT with its LoRA adapters and
low-precision base weights, the alignment projectors and the EMA. A DiT starts from `model.dit`, or from random
weights (seeded with `seed`) with the architecture `model.dit_config`."""

import functools
import warnings

import torch

from ..errors import RefAlignInputError
from ..models.checkpoint import DTYPES, apply_layerwise_casting, load_dit, validated_original
from ..models.safetensors_io import read_safetensors, read_safetensors_shapes
from ..models.text_encoder import TextEncoder, load_text_encoder
from ..models.transformer_refalign import RefAlignTransformer3DModel
from ..models.vae import load_vae
from ..models.vfm import load_vfm
from .alignment import AlignmentProjectors, default_aligned_blocks
from .config import TrainingConfig
from .distill import FAKE_SCORE, STUDENT, DistillationModule
from .module import LORA_TARGETS, RefAlignTrainingModule

WEIGHT_DTYPES = {name: DTYPES[name] for name in ("bf16", "fp8_e4m3fn")}  # memory.base_weights


def _random_dit(config: TrainingConfig) -> RefAlignTransformer3DModel:
    """A DiT with the architecture `model.dit_config`, random weights seeded with `seed`."""
    torch.manual_seed(config.seed)
    return RefAlignTransformer3DModel(**config.model.dit_config).eval()


class Encoders:
    """The frozen models that turn clips and preview inputs into features, each loaded on first use."""

    def __init__(self, config: TrainingConfig, device):
        self.config, self.device = config, device

    @functools.cached_property
    def vae(self):
        return load_vae(self.config.model.vae, device=self.device)

    @functools.cached_property
    def text_encoder(self) -> TextEncoder:
        return load_text_encoder(self.config.model.text_encoder, device=self.device)

    @functools.cached_property
    def vfm(self):
        return load_vfm(self.config.model.vfm).to(self.device)

    def release_text_encoder(self) -> None:
        self.__dict__.pop("text_encoder", None)


def _dit_config(config: TrainingConfig) -> dict:
    """The DiT's architecture, read from the file's header (from random weights: built on the meta device)."""
    m = config.model
    if m.dit is not None:
        return validated_original(*read_safetensors_shapes(m.dit, "model.dit"), path=f"model.dit {m.dit}")[1]
    try:
        with torch.device("meta"), torch.random.fork_rng(devices=[]):  # leaves the global RNG as it was
            return dict(_random_dit(config).config)
    except (TypeError, ValueError, RuntimeError) as e:
        raise RefAlignInputError(f"model.dit_config {m.dit_config}: not a valid DiT config: {e}") from e


def check_model(config: TrainingConfig, vfm_dim: int | None) -> None:
    """The DiT's architecture against the config (`model.dit_config`, `alignment.blocks`, `alignment.
    init_projectors`), from the files' headers: before the feature cache is built. `vfm_dim`: the VFM's width
    (needed only with init_projectors)."""
    a = config.alignment
    dit_config = _dit_config(config)
    if not a.enabled:
        return
    layers = dit_config["num_layers"]
    blocks = a.blocks or default_aligned_blocks(layers)
    if max(blocks) >= layers:
        raise RefAlignInputError(f"alignment.blocks {blocks}: the DiT has {layers} blocks (0–{layers - 1})")
    if a.init_projectors:
        with torch.device("meta"):
            width = dit_config["num_attention_heads"] * dit_config["attention_head_dim"]
            expected = AlignmentProjectors(width, vfm_dim, blocks).state_dict()
        stored, _ = read_safetensors_shapes(a.init_projectors, "alignment.init_projectors")
        differs = sorted(k for k in expected.keys() | stored.keys()
                         if k not in expected or k not in stored or expected[k].shape != stored[k].shape)
        if differs:
            raise RefAlignInputError(f"alignment.init_projectors {a.init_projectors} does not fit this DiT, VFM "
                                     f"({vfm_dim} wide) and blocks {blocks}: {differs[:5]} differ")


def _load_dit(config: TrainingConfig):
    """The DiT in training mode, its base weights stored as `memory.base_weights` asks."""
    base_dtype = WEIGHT_DTYPES.get(config.memory.base_weights)
    if config.model.dit is not None:
        return load_dit(config.model.dit, weight_dtype=base_dtype).train()
    dit = _random_dit(config)
    if base_dtype is not None:
        apply_layerwise_casting(dit, base_dtype, torch.float32)
    return dit.train()


def _projectors(config: TrainingConfig, dit, vfm_dim: int) -> AlignmentProjectors | None:
    """The alignment projectors (from `alignment.init_projectors` in stage 2), or None without alignment."""
    a = config.alignment
    if not a.enabled:
        return None
    blocks = a.blocks or default_aligned_blocks(dit.config.num_layers)  # checked by `check_model`
    projectors = AlignmentProjectors(dit.config.num_attention_heads * dit.config.attention_head_dim, vfm_dim, blocks)
    if a.init_projectors:
        tensors, _ = read_safetensors(a.init_projectors, "alignment.init_projectors")
        try:
            projectors.load_state_dict(tensors, strict=True)
        except RuntimeError as e:
            raise RefAlignInputError(f"alignment.init_projectors {a.init_projectors} does not fit this DiT, "
                                     f"VFM and blocks: {e}") from e
    return projectors


def _make_trainable(config: TrainingConfig, dit, adapters: tuple[str, ...] = (STUDENT,)) -> None:
    """LoRA adapters (trained in fp32 over any base storage; the first is the active one) on a frozen DiT, or the
    whole DiT trainable."""
    t = config.train
    if t.mode != "lora":
        dit.requires_grad_(True)
        return
    from peft import LoraConfig

    dit.requires_grad_(False)
    for adapter in adapters:
        with warnings.catch_warnings():  # peft warns of "multiple adapters" from the second on: they are meant
            warnings.filterwarnings("ignore", "Already found a `peft_config`")
            dit.add_adapter(LoraConfig(r=t.lora_rank, lora_alpha=t.lora_alpha, target_modules=LORA_TARGETS,
                                       init_lora_weights=True), adapter_name=adapter)
    if len(adapters) > 1:
        dit.set_adapters(adapters[0])
    for name, param in dit.named_parameters():
        if "lora_" in name:
            param.data = param.data.float()
            param.requires_grad_(True)


def build_module(config: TrainingConfig, vfm_dim: int, vfm=None, negative: torch.Tensor | None = None):
    """The DiT (with LoRA adapters and low-precision base weights when asked) and the projectors, or with
    `distill.enabled` the student over the frozen teacher (negative: the teacher's negative prompt `[1, L, D]`)."""
    torch.manual_seed(config.seed)
    dit = _load_dit(config)
    if config.distill.enabled:
        d = config.distill
        _make_trainable(config, dit, (STUDENT, FAKE_SCORE) if d.dmd_weight else (STUDENT,))
        if config.memory.gradient_checkpointing:
            dit.enable_gradient_checkpointing()
        return DistillationModule(dit, d.teacher(config.shift), negative, d.student_steps, config.shift,
                                  d.regression_weight, d.dmd_weight, d.fake_score_updates)
    projectors = _projectors(config, dit, vfm_dim)
    _make_trainable(config, dit)
    if config.memory.gradient_checkpointing:
        dit.enable_gradient_checkpointing()
    a = config.alignment
    return RefAlignTrainingModule(dit, projectors, ra_weight=a.weight, shift=config.shift, pos_margin=a.pos_margin,
                                  neg_margin=a.neg_margin, neg_weight=a.neg_weight,
                                  vfm=vfm if a.vfm_online else None, loss_weighting=config.train.loss_weighting)


def make_ema(params: list[torch.nn.Parameter], decay: float | None):
    """The EMA of the trained weights (exported instead of them), or None when `train.ema_decay` is off."""
    if not decay:
        return None
    if any(p.numel() == 0 for p in params):
        raise RefAlignInputError("train.ema_decay: EMA needs each process to hold its parameters (not DeepSpeed "
                                 "ZeRO-3); use ZeRO-2 or FSDP")
    from diffusers.training_utils import EMAModel

    return EMAModel(params, decay=decay)
