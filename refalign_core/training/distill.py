"""Few-step, guidance-free students of RefAlign ("turbo"): the frozen DiT is the teacher, LoRA adapters on the same
DiT are the student, so memory stays about one model.

The recipe: guidance-baked trajectory distillation. Per clip of the data (its prompt and references; the video
itself is not used) and per step's noise, the teacher samples with its full schedule and three-pass guidance
(`sample_r2v`, adapters disabled); the student runs the preset's few Euler steps from the same noise with one pass
(prompt + references) and is trained, through its unrolled steps, to land on the teacher's result:

    L = ‖ Euler_student(noise; K steps, c_txt) − Sampler_teacher(noise; N steps, three passes) ‖²

Why this and not DMD2 first: DMD2 adds a "fake score" model trained online on the student's samples and a real-score
evaluation of the three-pass teacher at random timesteps, several extra DiT passes per step; its regression term is
this loss. On the toy's CPU budget the regression alone is what trains in minutes, it is deterministic given the
noise (so resume is exact), and it optimises what the turbo bench measures. Its known limit is blur where the
student cannot follow the teacher exactly; distribution matching is the next step when that shows."""

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from ..inference.sampler import SamplingSettings, initial_noise, make_scheduler, sample_r2v
from .module import StepLosses, TrainingBatch


@contextmanager
def adapters_disabled(dit):
    """The base DiT (the teacher) for the duration: LoRA adapters off, on again after."""
    dit.disable_adapters()
    try:
        yield dit
    finally:
        dit.enable_adapters()


def student_sample(dit, noise: torch.Tensor, text: torch.Tensor, references: torch.Tensor,
                   sigmas: torch.Tensor) -> torch.Tensor:
    """The student's sampler, differentiable: Euler over `sigmas` (decreasing, ending at 0) with one pass (prompt +
    references). noise `[1, C, T', h, w]`; returns the clean latents."""
    x = noise
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        timestep = (sigma * 1000).reshape(1).to(x.device)
        x = x + (sigma_next - sigma) * dit(x, timestep, text, reference_latents=references).sample
    return x


def clip_settings(teacher: SamplingSettings, latents_shape: torch.Size, seed: int) -> SamplingSettings:
    """The teacher's settings at the size of a batch's clips `[B, C, T', h, w]`."""
    return teacher.replace(width=latents_shape[4] * 8, height=latents_shape[3] * 8,
                           num_frames=(latents_shape[2] - 1) * 4 + 1, seed=seed)


class DistillationModule(nn.Module):
    """The DiT with LoRA adapters; `forward(batch)` returns the distillation loss (mean over the batch's clips).
    teacher: the teacher's sampling settings (steps, shift, scales, sampler); negative: the teacher's negative
    prompt embeddings `[1, L, text_dim]`; student_steps / student_shift: the preset's Euler schedule."""

    def __init__(self, dit: nn.Module, teacher: SamplingSettings, negative: torch.Tensor, student_steps: int,
                 student_shift: float):
        super().__init__()
        self.dit, self.teacher = dit, teacher
        self.register_buffer("negative", negative.float(), persistent=False)
        sigmas = make_scheduler("euler", student_steps, student_shift).sigmas.float()
        self.register_buffer("student_sigmas", sigmas, persistent=False)

    def forward(self, batch: TrainingBatch) -> StepLosses:
        device = next(self.dit.parameters()).device
        losses = []
        for i in range(len(batch.latents)):
            count = int(batch.reference_mask[i].sum())
            references = batch.references[i:i + 1, :, :count].to(device)
            text = batch.text[i:i + 1].to(device)
            seed = int(torch.randint(0, 2**62, (1,), generator=batch.generator))
            settings = clip_settings(self.teacher, batch.latents.shape, seed)
            with adapters_disabled(self.dit):
                target = sample_r2v(self.dit, text, self.negative, references, settings)
            noise = initial_noise(settings.latent_shape(batch.latents.shape[1]), seed).to(device)
            student = student_sample(self.dit, noise, text, references, self.student_sigmas.to(device))
            losses.append(F.mse_loss(student.float(), target.to(device)))
        loss = torch.stack(losses).mean()
        zero = loss.new_zeros(())
        return StepLosses(loss, loss.detach(), zero, zero, zero, self.student_sigmas[:1] * 1000)
