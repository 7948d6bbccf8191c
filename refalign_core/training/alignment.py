"""RefAlign training objective: flow matching on the video + the reference-alignment (RA) loss.

For aligned block l, reference tokens x_i (N = K·T per sample, subject s(i) = ⌊i/T⌋) are projected
h_i = P_l(x_i) and compared with the frozen VFM tokens f_j by cosine c_ij:

    pos_l = mean_i relu((1 − c_ii) − m_pos)
    neg_l = mean_{(i,j): s(i) ≠ s(j)} relu(m_neg − (1 − c_ij))        (0 when K = 1)
    L_RA  = mean_l (pos_l + λ_neg · neg_l),   zero for samples whose references were dropped
    L     = L_FM + λ · g(t) · L_RA,   g(t) = (t / 1000)^3
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

NUM_TRAIN_TIMESTEPS = 1000


class ReferenceProjector(nn.Sequential):
    """Token-wise MLP dim → dim/2 → vfm_dim, SiLU, no bias (training only)."""

    def __init__(self, dim: int, vfm_dim: int):
        super().__init__(nn.Linear(dim, dim // 2, bias=False), nn.SiLU(), nn.Linear(dim // 2, vfm_dim, bias=False))


class AlignmentProjectors(nn.Module):
    """One projector per aligned block. State-dict keys are the official `blocks.{i}.input_mlp.proj.{0,2}.weight`."""

    def __init__(self, dim: int, vfm_dim: int, blocks):
        super().__init__()
        self.block_indices = sorted(int(b) for b in blocks)
        self.blocks = nn.ModuleDict({str(i): nn.ModuleDict({"input_mlp": nn.ModuleDict({
            "proj": ReferenceProjector(dim, vfm_dim)})}) for i in self.block_indices})

    def __getitem__(self, block: int) -> ReferenceProjector:
        return self.blocks[str(block)]["input_mlp"]["proj"]


def default_aligned_blocks(num_layers: int) -> list[int]:
    """Blocks 0..8 (the paper's choice for 30- and 40-block models), or the first third of a smaller model."""
    return list(range(9)) if num_layers >= 27 else list(range(max(1, num_layers // 3)))


@dataclass
class RALoss:
    total: torch.Tensor  # pos + λ_neg·neg, averaged over blocks and kept samples (scalar)
    positive: torch.Tensor
    negative: torch.Tensor


def _reference_mask(references, batch: int, n_tokens: int, device) -> torch.Tensor:
    """`references`: K (every sample has K) or a `[B, K]` bool mask (False = padding) -> `[B, K]` bool."""
    if isinstance(references, int):
        return torch.ones(batch, references, dtype=torch.bool, device=device)
    if references.ndim != 2 or references.shape[0] != batch or references.dtype != torch.bool:
        raise ValueError(f"reference mask must be a bool tensor [B={batch}, K], got {references.dtype} "
                         f"{list(references.shape)}")
    return references.to(device)


def ra_loss_per_sample(features: dict[int, torch.Tensor], vfm_tokens: torch.Tensor, projectors: AlignmentProjectors,
                       references, pos_margin: float = 0.0, neg_margin: float = 1.0,
                       neg_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """features: block -> `[B, N, dim]` reference-token features; vfm_tokens `[B, N, vfm_dim]`, N = K·T;
    references: K, or a `[B, K]` bool mask for a batch padded to K references (padding tokens are left out of both
    terms, so each sample's loss equals its unpadded loss). Returns (positive `[B]`, negative `[B]`), each averaged
    over the aligned blocks."""
    batch, n_tokens, _ = vfm_tokens.shape
    mask = _reference_mask(references, batch, n_tokens, vfm_tokens.device)
    if n_tokens % mask.shape[1]:
        raise ValueError(f"{n_tokens} reference tokens do not split into {mask.shape[1]} references")
    per_ref = n_tokens // mask.shape[1]
    subject = torch.arange(n_tokens, device=vfm_tokens.device) // per_ref
    valid = mask.repeat_interleave(per_ref, dim=1).float()  # [B, N]
    cross = (subject[:, None] != subject[None, :]).float() * valid[:, :, None] * valid[:, None, :]  # [B, N, N]
    cross_pairs = cross.sum((1, 2))
    target = F.normalize(vfm_tokens.float().detach(), dim=-1)
    positives, negatives = [], []
    for block, x in sorted(features.items()):
        h = F.normalize(projectors[block](x).float(), dim=-1)  # [B, N, vfm_dim]
        positive = F.relu((1 - (h * target).sum(-1)) - pos_margin)
        positives.append((positive * valid).sum(-1) / valid.sum(-1).clamp(min=1))
        if bool(cross_pairs.any()):
            cos = h @ target.transpose(1, 2)  # [B, N, N]: c_ij = cos(h_i, f_j)
            negatives.append((F.relu(neg_margin - (1 - cos)) * cross).sum((1, 2)) / cross_pairs.clamp(min=1))
        else:  # one reference per sample: no cross-subject pairs
            negatives.append(torch.zeros(batch, device=h.device))
    return torch.stack(positives).mean(0), torch.stack(negatives).mean(0) * neg_weight


def ra_loss(features, vfm_tokens, projectors, references, keep=None, gate=None, **margins) -> RALoss:
    """RA loss over a batch. references: K, or a `[B, K]` bool mask (see `ra_loss_per_sample`). `keep` `[B]`
    (0/1) zeroes samples whose references were dropped (the official code multiplies by 0, so every parameter still
    gets a gradient); `gate` `[B]` is g(t). `total` is mean_b keep·gate·(pos + neg); `positive` / `negative` are
    ungated means over kept samples, for logging."""
    pos, neg = ra_loss_per_sample(features, vfm_tokens, projectors, references, **margins)
    keep = torch.ones_like(pos) if keep is None else keep.to(pos)
    gate = torch.ones_like(pos) if gate is None else gate.to(pos)
    kept = keep.sum().clamp(min=1)
    return RALoss(total=(keep * gate * (pos + neg)).mean(), positive=(keep * pos).sum() / kept,
                  negative=(keep * neg).sum() / kept)


def training_sigmas(shift: float = 5.0) -> torch.Tensor:
    """The 1000-point σ grid: u_n = 1 − n/1000, σ_n = shift·u/(1 + (shift − 1)·u)."""
    u = 1 - torch.arange(NUM_TRAIN_TIMESTEPS, dtype=torch.float64) / NUM_TRAIN_TIMESTEPS
    return shift * u / (1 + (shift - 1) * u)


def timestep_weights(timesteps: torch.Tensor) -> torch.Tensor:
    """w(t) = (y(t) − min y)·1000 / Σ(y − min y), y = exp(−2((t − 500)/1000)²), over the training grid (mean 1)."""
    y = torch.exp(-2 * ((timesteps - 500) / 1000) ** 2)
    y = y - y.min()
    return y * NUM_TRAIN_TIMESTEPS / y.sum()


def ra_gate(timesteps: torch.Tensor) -> torch.Tensor:
    """g(t) = (t/1000)^3: ~1 at pure noise, 0.125 at t = 500, → 0 near clean."""
    return (timesteps / NUM_TRAIN_TIMESTEPS) ** 3


@dataclass
class FlowMatchingSample:
    noisy: torch.Tensor  # x_t
    target: torch.Tensor  # v* = ε − x_0
    timesteps: torch.Tensor  # t = 1000·σ  [B]
    weights: torch.Tensor  # w(t)  [B]


LOSS_WEIGHTINGS = ("release", "uniform")


def flow_matching_sample(latents: torch.Tensor, generator: torch.Generator, shift: float = 5.0,
                         weighting: str = "release") -> FlowMatchingSample:
    """Draw n ~ U{0..999} per sample, x_t = (1 − σ)·x_0 + σ·ε. weighting "release": w(t) as released (0 at pure
    noise: right for fine-tuning a model that already lays out its videos); "uniform": w = 1 (training from
    scratch, where the high-noise steps that decide the layout must be learned)."""
    sigmas = training_sigmas(shift)
    grid_t = sigmas * NUM_TRAIN_TIMESTEPS
    weights = timestep_weights(grid_t) if weighting == "release" else torch.ones_like(grid_t)
    index = torch.randint(0, NUM_TRAIN_TIMESTEPS, (latents.shape[0],), generator=generator)
    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(latents)
    sigma = sigmas[index].to(latents).view(-1, *[1] * (latents.ndim - 1))
    return FlowMatchingSample(
        noisy=(1 - sigma) * latents + sigma * noise, target=noise - latents,
        timesteps=grid_t[index].float().to(latents.device), weights=weights[index].float().to(latents.device),
    )


def fm_loss(prediction: torch.Tensor, sample: FlowMatchingSample) -> torch.Tensor:
    """Mean over the batch of w(t)·mean((v_θ − v*)²)."""
    per_sample = (prediction.float() - sample.target.float()).square().flatten(1).mean(1)
    return (sample.weights * per_sample).mean()
