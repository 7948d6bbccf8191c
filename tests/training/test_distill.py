"""Turbo distillation (`refalign_core.training.distill`): the student trains LoRA adapters only, against the frozen
base sampled with three-pass guidance and, with distribution matching, against a fake score (its own adapters); what
it trains is what the turbo preset samples; a run resumes bit-exactly and exports the student alone."""

import csv
import dataclasses
import json

import pytest
import torch
from peft import LoraConfig
from safetensors import safe_open

from refalign_core.errors import RefAlignInputError
from refalign_core.inference.sampler import SamplingSettings, initial_noise, make_scheduler, sample_r2v, with_preset
from refalign_core.models.lora import LoraSpec, apply_loras
from refalign_core.training import load_training_config
from refalign_core.training.distill import FAKE_SCORE, STUDENT, DistillationModule, running_as, student_sample
from refalign_core.training.module import LORA_TARGETS, TrainingBatch
from tiny_models import TINY_DIT, tiny_dit
from train_runs import accelerate_fsdp, config, run, run_killed_at_checkpoint, same_files, torchrun

TEXT = TINY_DIT["text_dim"]
TEACHER = SamplingSettings(steps=3, shift=3.0, image_scale=2.0, text_scale=3.0)


def with_lora(dit, fake_score=False):
    """The student's adapters (random, so they change the output), and the fake score's (zero: it starts as the
    base) when asked; only LoRA weights train."""
    dit.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=LORA_TARGETS, init_lora_weights=False), STUDENT)
    if fake_score:
        dit.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=LORA_TARGETS, init_lora_weights=True),
                        FAKE_SCORE)
        dit.set_adapters(STUDENT)
    for name, param in dit.named_parameters():
        param.requires_grad_("lora_" in name)
    return dit


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return TrainingBatch(latents=torch.zeros(2, 16, 2, 4, 6), text=torch.randn(2, 5, TEXT, generator=g),
                         references=torch.randn(2, 16, 2, 4, 6, generator=g),
                         reference_mask=torch.tensor([[True, True], [True, False]]), vfm_tokens=None, images=None,
                         keep_references=torch.ones(2), generator=torch.Generator().manual_seed(seed))


def test_the_turbo_preset_samples_exactly_what_the_student_trains():
    dit = tiny_dit().eval()
    text, refs = torch.randn(1, 5, TEXT), torch.randn(1, 16, 1, 4, 6)
    settings = with_preset(SamplingSettings(num_frames=5, height=32, width=48, shift=3.0, seed=7), "turbo")
    sigmas = make_scheduler("euler", settings.steps, settings.shift).sigmas.float()
    with torch.no_grad():
        trained = student_sample(dit, initial_noise(settings.latent_shape(), 7), text, refs, sigmas)
    torch.testing.assert_close(sample_r2v(dit, text, torch.zeros(1, 5, TEXT), refs, settings), trained,
                               rtol=1e-5, atol=1e-5)


def test_the_teacher_is_the_base_model_and_only_the_adapters_learn():
    base = tiny_dit().eval()
    dit = with_lora(tiny_dit().eval())
    text, refs = torch.randn(1, 5, TEXT), torch.randn(1, 16, 2, 4, 6)
    settings = TEACHER.replace(num_frames=5, height=32, width=48)
    with running_as(dit, None):
        teacher = sample_r2v(dit, text, torch.zeros(1, 5, TEXT), refs, settings)
    assert torch.equal(teacher, sample_r2v(base, text, torch.zeros(1, 5, TEXT), refs, settings))
    assert not torch.equal(sample_r2v(dit, text, torch.zeros(1, 5, TEXT), refs, settings), teacher)  # adapters back

    module = DistillationModule(dit, TEACHER, torch.zeros(1, 3, TEXT), student_steps=2, student_shift=3.0)
    losses = module(batch())
    losses.total.backward()
    trained = {n for n, p in dit.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert trained and all("lora_" in n for n in trained)
    assert torch.isfinite(losses.total) and losses.total > 0
    assert torch.equal(module(batch()).total, losses.total)  # deterministic given the step's generator
    assert losses.terms["dmd"] is None and losses.terms["fake_score"] is None


def test_distribution_matching_trains_the_student_and_the_fake_score_each_on_its_own_term():
    dit = with_lora(tiny_dit().eval(), fake_score=True)
    module = DistillationModule(dit, TEACHER, torch.zeros(1, 3, TEXT), student_steps=2, student_shift=3.0,
                                regression_weight=0.0, dmd_weight=1.0)
    losses = module(batch())
    assert losses.terms["regression"] is None and losses.terms["dmd"] > 0 and losses.terms["fake_score"] > 0
    assert all(p.requires_grad for n, p in dit.named_parameters() if "lora_" in n)  # peft's switches undone
    assert all(m.active_adapters == [STUDENT] for m in dit.modules() if hasattr(m, "active_adapters")
               and not callable(m.active_adapters))
    settings = TEACHER.replace(num_frames=5, height=32, width=48)
    text, refs = torch.randn(1, 5, TEXT), torch.randn(1, 16, 2, 4, 6)
    student = student_sample(dit, initial_noise(settings.latent_shape(), 0), text, refs, module.student_sigmas)
    dmd = module.distribution_matching(student, text, refs, settings, torch.Generator().manual_seed(0))
    fake = module.fake_score_loss(student, text, refs, settings, torch.Generator().manual_seed(1))
    names, params = zip(*[(n, p) for n, p in dit.named_parameters() if p.requires_grad])
    for loss, owner in ((dmd, STUDENT), (fake, FAKE_SCORE)):
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        moved = {n for n, g in zip(names, grads) if g is not None and g.abs().sum() > 0}
        assert moved and all(f".{owner}." in n for n in moved), owner


def test_between_student_steps_the_fake_score_alone_learns(monkeypatch):
    """fake_score_updates = 3: steps 0 and 1 train the fake score on a student sample without gradients, and the
    teacher does not run; step 2 trains both, as every step does with 1."""
    import refalign_core.training.distill as distill
    dit = with_lora(tiny_dit().eval(), fake_score=True)
    module = DistillationModule(dit, TEACHER, torch.zeros(1, 3, TEXT), student_steps=2, student_shift=3.0,
                                regression_weight=1.0, dmd_weight=1.0, fake_score_updates=3)
    trained = {}
    for step in range(3):
        with monkeypatch.context() as patch:
            if step < 2:
                patch.setattr(distill, "sample_r2v", lambda *a, **k: pytest.fail("the teacher sampled"))
                patch.setattr(distill, "guided_velocity", lambda *a, **k: pytest.fail("the teacher ran"))
            losses = module(dataclasses.replace(batch(), step=step))
        dit.zero_grad(set_to_none=True)
        losses.total.backward()
        trained[step] = {n.split(".")[-2] for n, p in dit.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        assert (losses.terms["regression"] is None) == (step < 2) and (losses.terms["dmd"] is None) == (step < 2)
        assert losses.terms["fake_score"] > 0
    assert trained[0] == trained[1] == {FAKE_SCORE} and trained[2] == {FAKE_SCORE, STUDENT}


def test_the_dmd_gradient_is_zero_when_the_fake_score_is_the_teacher():
    """Teacher scales 1 / 1 leave the prompt pass alone; the fake score starts as the base: both predict the same
    clean video, so distribution matching has nothing to move (and does, with real guidance)."""
    dit = with_lora(tiny_dit().eval(), fake_score=True)
    unguided = DistillationModule(dit, TEACHER.replace(image_scale=1.0, text_scale=1.0), torch.zeros(1, 3, TEXT),
                                  student_steps=2, student_shift=3.0, regression_weight=0.0, dmd_weight=1.0)
    assert unguided(batch()).terms["dmd"] == 0
    guided = DistillationModule(dit, TEACHER, torch.zeros(1, 3, TEXT), student_steps=2, student_shift=3.0,
                                regression_weight=0.0, dmd_weight=1.0)
    assert guided(batch()).terms["dmd"] > 0


def test_previews_of_a_distillation_sample_as_the_turbo_preset():
    from refalign_core.training.config import DistillConfig
    settings = SamplingSettings(steps=30, image_scale=3.0, sampler="unipc", seed=4)
    assert DistillConfig().student(settings) == with_preset(settings, "turbo")
    assert DistillConfig(student_steps=2).student(settings).steps == 2


@pytest.mark.parametrize("section,match", [({"train": {"mode": "full"}}, "train.mode"),
                                           ({"alignment": {"enabled": True}}, "alignment"),
                                           ({"dropout": {"text": 0.1}}, "dropout"),
                                           ({"distill": {"regression_weight": 0.0}}, "both 0"),
                                           ({"distill": {"fake_score_updates": 5}}, "fake_score_updates")])
def test_a_distillation_config_that_cannot_work_is_refused(tmp_path, section, match):
    values = {"train": {"mode": "lora"}, "alignment": {"enabled": False},
              "dropout": {"text": 0.0, "references": 0.0, "both": 0.0}, "distill": {"enabled": True}}
    for key, changes in section.items():
        values[key] = {**values[key], **changes}
    with pytest.raises(RefAlignInputError, match=match):
        load_training_config(None, [f"{key}={value}" for key, value in _flat(values)])


def _flat(values, prefix=""):
    for key, value in values.items():
        if isinstance(value, dict):
            yield from _flat(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", str(value).lower() if isinstance(value, bool) else value


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory):
    from refalign_core.toy.world import make_toy_world
    folder = tmp_path_factory.mktemp("distill_data")
    return {"manifest": make_toy_world(folder / "world", num_videos=4, size=64, frames=17), "cache": folder / "cache"}


@pytest.mark.slow
def test_a_killed_distillation_resumes_bit_exactly_and_exports_a_lora_the_core_loads(tmp_path, toy_data):
    cfg = config(tmp_path, toy_data, train={"mode": "lora", "lora_rank": 4, "max_steps": 4, "checkpoint_every": 2,
                                            "batch_size": 1},
                 alignment={"enabled": False}, dropout={"text": 0.0, "references": 0.0, "both": 0.0},
                 distill={"enabled": True, "student_steps": 2, "teacher_steps": 3, "negative_prompt": "",
                          "dmd_weight": 0.5})
    run(["--config", cfg, "--output-dir", tmp_path / "straight"])
    run_killed_at_checkpoint(cfg, tmp_path / "killed", 2)
    run(["--config", cfg, "--output-dir", tmp_path / "killed", "--resume"])
    assert same_files(tmp_path / "straight" / "lora.safetensors", tmp_path / "killed" / "lora.safetensors")
    with safe_open(tmp_path / "straight" / "lora.safetensors", "pt") as f:
        metadata = f.metadata()
    assert json.loads(metadata["refalign.distill"])["student_steps"] == 2
    assert "refalign.preset" not in metadata  # 2 steps is not the turbo preset's 4 (the shipped student is: a test)
    with safe_open(tmp_path / "straight" / "lora.safetensors", "pt") as f:
        assert f.keys() and not any(FAKE_SCORE in k for k in f.keys())  # the student alone, ComfyUI's key names
    rows = (tmp_path / "straight" / "log.csv").read_text().split("\n")
    assert rows[0] == "step,loss,regression,dmd,fake_score,lr,timestep,batch,seconds" and len(rows) == 6
    dit = tiny_dit(**load_training_config(cfg).model.dit_config)
    before = dit.blocks[0].attn1.to_q.weight.clone()
    apply_loras(dit, (LoraSpec(str(tmp_path / "straight" / "lora.safetensors"), 1.0),))
    assert not torch.equal(dit.blocks[0].attn1.to_q.weight, before)


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["ddp", "fsdp"])
def test_distribution_matching_distils_on_two_processes(tmp_path, toy_data, launcher):
    """The adapters switch inside the forward (teacher, student, fake score), and a fake-score-only step leaves the
    student without gradients: under DDP and FSDP2 too."""
    launch = torchrun(29631) if launcher == "ddp" else accelerate_fsdp(29641)
    cfg = config(tmp_path, toy_data, train={"mode": "lora", "lora_rank": 4, "max_steps": 2, "checkpoint_every": 2,
                                            "batch_size": 1},
                 alignment={"enabled": False}, dropout={"text": 0.0, "references": 0.0, "both": 0.0},
                 distill={"enabled": True, "student_steps": 2, "teacher_steps": 2, "negative_prompt": "",
                          "regression_weight": 0.0, "dmd_weight": 1.0, "fake_score_updates": 2})
    result = run(["--config", cfg, "--output-dir", tmp_path / "run"], launcher=launch)
    assert f"{'FSDP' if launcher == 'fsdp' else 'MULTI_CPU'} on 2 processes" in result.stderr
    rows = list(csv.DictReader((tmp_path / "run" / "log.csv").open()))
    assert len(rows) == 2 and all(float(r["fake_score"]) > 0 and not r["regression"] for r in rows)
    assert not rows[0]["dmd"] and float(rows[1]["dmd"]) > 0  # step 1: the fake score alone; step 2: both
    with safe_open(tmp_path / "run" / "lora.safetensors", "pt") as f:
        assert f.keys() and not any(FAKE_SCORE in k for k in f.keys())
