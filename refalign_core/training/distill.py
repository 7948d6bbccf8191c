"""Few-step, guidance-free students of RefAlign ("turbo"): the frozen DiT is the teacher, LoRA adapters on the same
DiT are the student (and, for distribution matching, a second set is the "fake score"), so memory stays about one
model.

Per clip of the data (its prompt and references; the video itself is not used) and per step's noise, the student
runs the preset's few Euler steps from that noise with one pass (prompt + references), differentiably (`x_s`). Two
terms train it; `distill.regression_weight` and `distill.dmd_weight` weigh them:

- regression (guidance-baked trajectory distillation): the teacher samples from the same noise with its full
  schedule and three-pass guidance (`sample_r2v`, adapters off), and  L_reg = ‖x_s − x_teacher‖².
- distribution matching (DMD, Yin et al. 2024): x_s is noised to a random σ, x_t = (1 − σ)·x_s + σ·ε; the teacher's
  three-pass prediction x̂_real and the fake score's one-pass prediction x̂_fake of the clean video give the gradient
  g = (x̂_fake − x̂_real) / mean|x_s − x̂_real|, applied as L_dmd = ½‖x_s − sg(x_s − g)‖². The fake score (its own
  LoRA, starting as the teacher) learns the student's samples online by flow matching: L_fake = ‖v_fake(x'_t) −
  (ε' − sg(x_s))‖². One backward updates both: the terms reach disjoint adapters. With
  `distill.fake_score_updates` = k > 1 (DMD2's two time-scale rule), only every k-th step trains the student; on the
  others the fake score alone learns, from a student sample drawn without gradients (no teacher runs), so it keeps
  up with a student that moves.

Regression alone is what trains in minutes on the toy's CPU budget; it is deterministic given the noise and
optimises what the turbo bench measures, but it blurs where the student cannot follow the teacher. Distribution
matching asks only that the student's videos be ones the teacher would make, at one teacher evaluation per clip
instead of a whole sampling; DMD (v1) pairs it with the regression term, DMD2 drops that term."""

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from ..inference.sampler import SamplingSettings, guided_velocity, initial_noise, make_scheduler, sample_r2v
from .alignment import flow_matching_sample
from .module import StepLosses, TrainingBatch

STUDENT, FAKE_SCORE = "default", "fake_score"  # the LoRA adapters' names (the student's is the one exported)


@contextmanager
def running_as(dit, adapter: str | None):
    """The DiT runs as the teacher (None: adapters off), the student or the fake score for the block; the student
    is active again after. peft's switches change which LoRA weights require gradients: those flags are kept."""
    lora = [p for name, p in dit.named_parameters() if "lora_" in name]
    flags = [p.requires_grad for p in lora]
    if adapter is None:
        dit.disable_adapters()
    elif adapter != STUDENT:
        dit.set_adapters(adapter)
    try:
        yield dit
    finally:
        if adapter is None:
            dit.enable_adapters()
        elif adapter != STUDENT:
            dit.set_adapters(STUDENT)
        for p, flag in zip(lora, flags):
            p.requires_grad_(flag)


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
    prompt embeddings `[1, L, text_dim]`; student_steps / student_shift: the preset's Euler schedule;
    regression_weight / dmd_weight: the terms' weights (distribution matching needs the FAKE_SCORE adapter);
    fake_score_updates: the fake score's steps per student step (the student learns on steps k−1, 2k−1, …)."""

    LOG_TERMS = ("regression", "dmd", "fake_score")
    PLOT_PANELS = (("regression",), ("dmd", "fake_score"))

    def __init__(self, dit: nn.Module, teacher: SamplingSettings, negative: torch.Tensor, student_steps: int,
                 student_shift: float, regression_weight: float = 1.0, dmd_weight: float = 0.0,
                 fake_score_updates: int = 1):
        super().__init__()
        self.dit, self.teacher = dit, teacher
        self.regression_weight, self.dmd_weight = regression_weight, dmd_weight
        self.fake_score_updates = fake_score_updates
        self.register_buffer("negative", negative.float(), persistent=False)
        sigmas = make_scheduler("euler", student_steps, student_shift).sigmas.float()
        self.register_buffer("student_sigmas", sigmas, persistent=False)

    def trains_student(self, step: int) -> bool:
        return (step + 1) % self.fake_score_updates == 0

    def forward(self, batch: TrainingBatch) -> StepLosses:
        device = next(self.dit.parameters()).device
        terms = {name: [] for name in self.LOG_TERMS}
        student_step = self.trains_student(batch.step)
        weights = {"regression": self.regression_weight, "dmd": self.dmd_weight} if student_step else {}
        for i in range(len(batch.latents)):
            count = int(batch.reference_mask[i].sum())
            references = batch.references[i:i + 1, :, :count].to(device)
            text = batch.text[i:i + 1].to(device)
            seed = int(torch.randint(0, 2**62, (1,), generator=batch.generator))
            settings = clip_settings(self.teacher, batch.latents.shape, seed)
            if weights.get("regression"):
                with running_as(self.dit, None):
                    target = sample_r2v(self.dit, text, self.negative, references, settings)
            noise = initial_noise(settings.latent_shape(batch.latents.shape[1]), seed).to(device)
            with torch.set_grad_enabled(student_step and torch.is_grad_enabled()):
                student = student_sample(self.dit, noise, text, references, self.student_sigmas.to(device)).float()
            if weights.get("regression"):
                terms["regression"].append(F.mse_loss(student, target.to(device)))
            if weights.get("dmd"):
                terms["dmd"].append(self.distribution_matching(student, text, references, settings, batch.generator))
            if self.dmd_weight:
                terms["fake_score"].append(self.fake_score_loss(student, text, references, settings, batch.generator))
        means = {name: torch.stack(values).mean() if values else None for name, values in terms.items()}
        total = sum(w * means[name] for name, w in weights.items() if w)
        if means["fake_score"] is not None:
            total = total + means["fake_score"]
        logged = {name: None if value is None else value.detach() for name, value in means.items()}
        return StepLosses(total, logged, self.student_sigmas[:1] * 1000)

    def distribution_matching(self, student: torch.Tensor, text: torch.Tensor, references: torch.Tensor,
                              settings: SamplingSettings, generator: torch.Generator) -> torch.Tensor:
        """L_dmd for one clip's student sample `[1, C, T', h, w]` (with its graph)."""
        noised = flow_matching_sample(student.detach(), generator, settings.shift, "uniform")
        sigma = noised.timesteps.view(-1, 1, 1, 1, 1) / 1000
        with torch.no_grad():
            with running_as(self.dit, None):
                real_v = guided_velocity(self.dit, noised.noisy, noised.timesteps, text, self.negative, references,
                                         settings).to(student.device)
            with running_as(self.dit, FAKE_SCORE):
                fake_v = self.dit(noised.noisy, noised.timesteps, text, reference_latents=references).sample.float()
            real, fake = noised.noisy - sigma * real_v, noised.noisy - sigma * fake_v  # x̂_0 of each
            gradient = torch.nan_to_num((fake - real) / (student - real).abs().mean().clamp_min(1e-8))
        return 0.5 * F.mse_loss(student, (student - gradient).detach())

    def fake_score_loss(self, student: torch.Tensor, text: torch.Tensor, references: torch.Tensor,
                        settings: SamplingSettings, generator: torch.Generator) -> torch.Tensor:
        """L_fake: the fake score follows the student's samples, flow matching on one (its own σ and noise)."""
        sample = flow_matching_sample(student.detach(), generator, settings.shift, "uniform")
        with running_as(self.dit, FAKE_SCORE):
            v = self.dit(sample.noisy, sample.timesteps, text, reference_latents=references).sample
        return F.mse_loss(v.float(), sample.target)
