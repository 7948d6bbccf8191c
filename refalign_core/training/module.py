"""One RefAlign training step: a batch assembled from cached clips with CFG dropout (padded to a common number of
references and text length), the loss module L = L_FM + λ·g(t)·L_RA, and LoRA export in ComfyUI's format."""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..models.checkpoint import diffusers_to_original_key
from ..models.text_encoder import TEXT_LENGTH
from .alignment import AlignmentProjectors, flow_matching_sample, fm_loss, ra_gate, ra_loss


@dataclass
class TrainingBatch:
    latents: torch.Tensor  # [B, 16, T', h, w] clean video latents (one bucket: one shape)
    text: torch.Tensor  # [B, L, text_dim], zero-padded to L
    references: torch.Tensor  # [B, 16, K, h, w] clean; a sample with fewer references is padded with zero frames
    reference_mask: torch.Tensor  # [B, K] bool: False for padding (a dropped reference set is one real zero frame)
    vfm_tokens: torch.Tensor | None  # [B, K·T, vfm_dim] teacher tokens (zeros where padded or dropped), or None
    images: torch.Tensor | None  # [B, K, 3, H, W] in [0, 1] for VFM-online training, else None
    keep_references: torch.Tensor  # [B] 1.0, or 0.0 where the references were dropped
    generator: torch.Generator  # this step's randomness (noise, timestep)
    step: int = 0  # the optimizer step it trains (0-based)

    @property
    def num_references(self) -> torch.Tensor:
        return self.reference_mask.sum(1)


def _pad_to(tensor: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    pad = [0, 0] * (tensor.ndim - 1 - dim) + [0, length - tensor.shape[dim]]
    return F.pad(tensor, pad)


def make_training_batch(samples: list[dict], null_prompt: torch.Tensor, generator: torch.Generator,
                        text_dropout: float = 0.1, reference_dropout: float = 0.1, both_dropout: float = 0.1,
                        text_length: int = TEXT_LENGTH, step: int = 0) -> TrainingBatch:
    """Cached clips (one bucket) -> a batch. Per clip, CFG dropout as released: r < p_t → empty prompt; next p_r →
    references dropped (one all-zero latent frame, RA multiplied by 0); next p_b → both; otherwise both kept; and
    one augmented copy of its references. Prompts are zero-padded to `text_length` tokens, as at inference
    (padding tokens enter cross-attention); references are padded to the batch's largest count and masked."""
    texts, refs, tokens, images, keep = [], [], [], [], []
    for sample in samples:
        r = float(torch.rand(1, generator=generator))
        drop_text = r < text_dropout or \
            text_dropout + reference_dropout <= r < text_dropout + reference_dropout + both_dropout
        drop_refs = text_dropout <= r < text_dropout + reference_dropout + both_dropout
        copy = int(torch.randint(0, sample["reference_latents"].shape[0], (1,), generator=generator))
        ref = sample["reference_latents"][copy].float()  # [K, 16, h, w]
        token = sample["vfm_tokens"][copy].float() if "vfm_tokens" in sample else None  # [K·T, D]
        image = sample["reference_images"][copy].float() / 255.0 if "reference_images" in sample else None
        if drop_refs:
            per_ref = token.shape[0] // ref.shape[0] if token is not None else 0
            ref = torch.zeros_like(ref[:1])
            token = torch.zeros_like(token[:per_ref]) if token is not None else None
            image = torch.zeros_like(image[:1]) if image is not None else None
        text = null_prompt if drop_text else sample["prompt_embeds"]
        texts.append(text[:text_length].float())
        refs.append(ref), tokens.append(token), images.append(image), keep.append(0.0 if drop_refs else 1.0)
    most = max(r.shape[0] for r in refs)
    per_token = tokens[0].shape[0] // refs[0].shape[0] if tokens[0] is not None else 0
    return TrainingBatch(
        latents=torch.stack([s["video_latents"].float() for s in samples]),
        text=torch.stack([_pad_to(t, text_length, 0) for t in texts]),
        references=torch.stack([_pad_to(r, most, 0).transpose(0, 1) for r in refs]),
        reference_mask=torch.tensor([[k < r.shape[0] for k in range(most)] for r in refs]),
        vfm_tokens=torch.stack([_pad_to(t, most * per_token, 0) for t in tokens]) if tokens[0] is not None else None,
        images=torch.stack([_pad_to(i, most, 0) for i in images]) if images[0] is not None else None,
        keep_references=torch.tensor(keep),
        generator=generator,
        step=step,
    )


@dataclass
class StepLosses:
    """One micro-step: the loss to minimise, the logged terms by name (detached scalars; None where a term does not
    apply to this batch) and the timesteps `[B]`."""
    total: torch.Tensor
    terms: dict[str, torch.Tensor | None]
    timestep: torch.Tensor


class RefAlignTrainingModule(nn.Module):
    """DiT + projectors; `forward(batch)` returns L = L_FM + λ·g(t)·L_RA (one module, so DDP wraps both)."""

    LOG_TERMS = ("fm", "ra_pos", "ra_neg", "ra_gated")  # the log's columns, plotted in these panels:
    PLOT_PANELS = (("fm",), ("ra_pos", "ra_neg"))

    def __init__(self, dit: nn.Module, projectors: AlignmentProjectors | None, ra_weight: float = 1.0,
                 shift: float = 5.0, pos_margin: float = 0.0, neg_margin: float = 1.0, neg_weight: float = 1.0,
                 vfm: nn.Module | None = None, loss_weighting: str = "release"):
        super().__init__()
        self.dit, self.projectors, self.vfm = dit, projectors, vfm
        self.ra_weight, self.shift, self.loss_weighting = ra_weight, shift, loss_weighting
        self.margins = dict(pos_margin=pos_margin, neg_margin=neg_margin, neg_weight=neg_weight)

    def teacher_tokens(self, batch: TrainingBatch, device) -> torch.Tensor:
        """`[B, K·T, vfm_dim]`: cached, or (VFM online) the VFM run now on the kept samples' real references."""
        if batch.vfm_tokens is not None:
            return batch.vfm_tokens.to(device)
        if self.vfm is None:
            raise ValueError("this batch has no cached VFM tokens (cache built for VFM-online training) and the "
                             "training module has no VFM")
        b, k = batch.reference_mask.shape
        real = batch.reference_mask & (batch.keep_references[:, None] > 0)
        if bool(real.any()):
            computed = self.vfm(batch.images[real].to(device))  # [R, T, D]
            tokens = computed.new_zeros(b, k, *computed.shape[1:])
            tokens[real.to(device)] = computed
        else:  # every reference set was dropped: the RA loss is zeroed anyway
            h, w = batch.images.shape[-2:]
            tokens = torch.zeros(b, k, (h // 16) * (w // 16), self.vfm.dim, device=device)
        return tokens.flatten(1, 2)

    def forward(self, batch: TrainingBatch) -> StepLosses:
        device = next(self.dit.parameters()).device
        fm = flow_matching_sample(batch.latents.to(device), batch.generator, self.shift, self.loss_weighting)
        blocks = self.projectors.block_indices if self.projectors is not None else None
        mask = batch.reference_mask.to(device)
        out = self.dit(fm.noisy, fm.timesteps, batch.text.to(device), reference_latents=batch.references.to(device),
                       reference_feature_blocks=blocks, reference_mask=mask)
        loss_fm = fm_loss(out.sample, fm)
        if self.projectors is None:
            return StepLosses(loss_fm, {"fm": loss_fm.detach(), "ra_pos": None, "ra_neg": None,
                                        "ra_gated": loss_fm.new_zeros(())}, fm.timesteps)
        ra = ra_loss(out.reference_features, self.teacher_tokens(batch, device), self.projectors, mask,
                     keep=batch.keep_references.to(device), gate=ra_gate(fm.timesteps), **self.margins)
        total = loss_fm + self.ra_weight * ra.total
        kept = batch.keep_references > 0  # the RA terms are blank where the references were dropped
        several = bool((kept & (batch.num_references > 1)).any())  # the negative term needs two subjects
        return StepLosses(total, {"fm": loss_fm.detach(), "ra_pos": ra.positive.detach() if bool(kept.any()) else None,
                                  "ra_neg": ra.negative.detach() if several else None,
                                  "ra_gated": ra.total.detach()}, fm.timesteps)


LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"]


def lora_state_dict_for_comfyui(state_dict: dict[str, torch.Tensor], alpha: float,
                                adapter: str = "default") -> dict[str, torch.Tensor]:
    """peft LoRA weights in a diffusers-named DiT's state dict -> ComfyUI LoraLoader keys:
    `diffusion_model.<original Wan name>.lora_down.weight` (A), `.lora_up.weight` (B), `.alpha`."""
    out = {}
    suffix = f".lora_A.{adapter}.weight"
    for key, value in state_dict.items():
        if not key.endswith(suffix):
            continue
        module = key[: -len(suffix)]
        prefix = "diffusion_model." + diffusers_to_original_key(f"{module}.weight")[: -len(".weight")]
        up = state_dict[f"{module}.lora_B.{adapter}.weight"]
        out[f"{prefix}.lora_down.weight"] = value.detach().float().cpu().contiguous()
        out[f"{prefix}.lora_up.weight"] = up.detach().float().cpu().contiguous()
        out[f"{prefix}.alpha"] = torch.tensor(float(alpha))
    return out
