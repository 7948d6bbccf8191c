"""Pieces of a RefAlign training step that the trainer (`train/train.py`) and benchmarks share: batch assembly
with CFG dropout from cached features, the loss module, and LoRA export in ComfyUI's format."""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .alignment import AlignmentProjectors, flow_matching_sample, fm_loss, ra_gate, ra_loss
from .checkpoint import diffusers_to_original_key
from .text_encoder import TEXT_LENGTH


@dataclass
class TrainingBatch:
    latents: torch.Tensor  # [1, 16, T', h, w] clean video latents
    text: torch.Tensor  # [1, L, text_dim]
    references: torch.Tensor  # [1, 16, K, h, w] clean (K = 1 zero frame when dropped)
    vfm_tokens: torch.Tensor  # [1, K·T, vfm_dim] (zeros when dropped)
    images: torch.Tensor  # [K, 3, H, W] in [0, 1]: what the VFM sees (for VFM-online training)
    keep_references: torch.Tensor  # [1] 1.0, or 0.0 when the references were dropped
    num_references: int
    generator: torch.Generator  # this step's randomness (noise, timestep)


def make_training_batch(sample: dict, null_prompt: torch.Tensor, generator: torch.Generator,
                        text_dropout: float = 0.1, reference_dropout: float = 0.1, both_dropout: float = 0.1,
                        text_length: int = TEXT_LENGTH) -> TrainingBatch:
    """CFG dropout as released: r < p_t → empty prompt; next p_r → references dropped (one all-zero latent frame,
    RA multiplied by 0); next p_b → both; otherwise both kept. One augmented copy of the references is picked.
    The prompt is zero-padded to `text_length` tokens, as at inference (padding tokens enter cross-attention)."""
    r = float(torch.rand(1, generator=generator))
    drop_text = r < text_dropout or text_dropout + reference_dropout <= r < text_dropout + reference_dropout + both_dropout
    drop_refs = text_dropout <= r < text_dropout + reference_dropout + both_dropout
    copy = int(torch.randint(0, sample["reference_latents"].shape[0], (1,), generator=generator))
    refs = sample["reference_latents"][copy]  # [K, 16, h, w]
    tokens = sample["vfm_tokens"][copy].float()
    images = sample["reference_images"][copy].float() / 255.0
    text = null_prompt if drop_text else sample["prompt_embeds"]
    if drop_refs:
        per_ref = tokens.shape[0] // refs.shape[0]
        refs, tokens = torch.zeros_like(refs[:1]), torch.zeros_like(tokens[:per_ref])
    return TrainingBatch(
        latents=sample["video_latents"][None].float(),
        text=F.pad(text, (0, 0, 0, max(0, text_length - text.shape[0])))[None].float(),
        references=refs.transpose(0, 1)[None].float(),
        vfm_tokens=tokens[None],
        images=images,
        keep_references=torch.tensor([0.0 if drop_refs else 1.0]),
        num_references=refs.shape[0],
        generator=generator,
    )


@dataclass
class StepLosses:
    total: torch.Tensor
    fm: torch.Tensor
    ra_positive: torch.Tensor
    ra_negative: torch.Tensor
    ra_gated: torch.Tensor
    timestep: torch.Tensor


class RefAlignTrainingModule(nn.Module):
    """DiT + projectors; `forward(batch)` returns L = L_FM + λ·g(t)·L_RA (one module, so DDP wraps both)."""

    def __init__(self, dit: nn.Module, projectors: AlignmentProjectors | None, ra_weight: float = 1.0,
                 shift: float = 5.0, pos_margin: float = 0.0, neg_margin: float = 1.0, neg_weight: float = 1.0,
                 vfm: nn.Module | None = None):
        super().__init__()
        self.dit, self.projectors, self.vfm = dit, projectors, vfm
        self.ra_weight, self.shift = ra_weight, shift
        self.margins = dict(pos_margin=pos_margin, neg_margin=neg_margin, neg_weight=neg_weight)

    def forward(self, batch: TrainingBatch) -> StepLosses:
        device = next(self.dit.parameters()).device
        fm = flow_matching_sample(batch.latents.to(device), batch.generator, self.shift)
        blocks = self.projectors.block_indices if self.projectors is not None else None
        out = self.dit(fm.noisy, fm.timesteps, batch.text.to(device), reference_latents=batch.references.to(device),
                       reference_feature_blocks=blocks)
        loss_fm = fm_loss(out.sample, fm)
        zero = loss_fm.new_zeros(())
        if self.projectors is None:
            return StepLosses(loss_fm, loss_fm.detach(), zero, zero, zero, fm.timesteps)
        tokens = batch.vfm_tokens.to(device)
        if self.vfm is not None and batch.keep_references.item() > 0:  # VFM online: the teacher runs every step
            tokens = self.vfm(batch.images.to(device)).flatten(0, 1)[None]
        ra = ra_loss(out.reference_features, tokens, self.projectors, batch.num_references,
                     keep=batch.keep_references.to(device), gate=ra_gate(fm.timesteps), **self.margins)
        total = loss_fm + self.ra_weight * ra.total
        return StepLosses(total, loss_fm.detach(), ra.positive.detach(), ra.negative.detach(), ra.total.detach(),
                          fm.timesteps)


LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"]


def lora_state_dict_for_comfyui(dit: nn.Module, alpha: float, adapter: str = "default") -> dict[str, torch.Tensor]:
    """peft LoRA weights of a diffusers-named DiT -> ComfyUI LoraLoader keys:
    `diffusion_model.<original Wan name>.lora_down.weight` (A), `.lora_up.weight` (B), `.alpha`."""
    out = {}
    for name, module in dit.named_modules():
        if not hasattr(module, "lora_A") or adapter not in module.lora_A:
            continue
        prefix = "diffusion_model." + diffusers_to_original_key(f"{name}.weight")[: -len(".weight")]
        out[f"{prefix}.lora_down.weight"] = module.lora_A[adapter].weight.detach().float().cpu().contiguous()
        out[f"{prefix}.lora_up.weight"] = module.lora_B[adapter].weight.detach().float().cpu().contiguous()
        out[f"{prefix}.alpha"] = torch.tensor(float(alpha))
    return out
