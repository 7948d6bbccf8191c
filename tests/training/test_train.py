"""train/train.py and `refalign_core.training.train`: the tiny recipe end to end with previews, bit-exact resume
(1 process; DDP and FSDP2: test_train_processes.py), LoRA export over fp8 base weights, resume safety, config errors."""

import csv
import json
import re
import signal
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from refalign_core.models.checkpoint import dit_from_state_dict, dit_state_dict_original, load_dit
from refalign_core.errors import RefAlignInputError
from refalign_core.models.lora import merge_lora
from tiny_models import tiny_dit
from refalign_core.training import LORA_TARGETS, load_training_config, lora_state_dict_for_comfyui
from train_runs import ENV, ROOT, TINY, TRAIN, config, run, run_killed_at_checkpoint, same_files


def initial_dit():
    """The DiT tiny.yaml starts from (random weights, the config's seed)."""
    config = load_training_config(TINY)
    return tiny_dit(config.seed, **config.model.dit_config)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, data):
    out = tmp_path_factory.mktemp("tiny_run")
    world = data["manifest"].parent
    first = next(clip for clip in map(json.loads, data["manifest"].read_text().splitlines())
                 if len(clip["references"]) == 2)
    refs = " ".join(f"--ref {world / r['image']} --mask {world / r['mask']} --name {r['subject']}"
                    for r in first["references"])
    (out / "prompts.txt").write_text(f"# a two-subject clip of the toy world\n{first['caption']} {refs} "
                                     "--w 64 --h 64 --f 5 --s 3 --d 1\n")
    cfg = config(out, data, previews={"prompts": str(out / "prompts.txt"), "every": 20})
    run(["--config", cfg, "--output-dir", out / "run", "--max-steps", 40])
    return out / "run"


def test_tiny_recipe_trains_and_the_ra_loss_decreases(tiny_run):
    rows = list(csv.DictReader((tiny_run / "log.csv").open()))
    assert [int(r["step"]) for r in rows] == list(range(1, 41))
    positive = [float(r["ra_pos"]) for r in rows if r["ra_pos"]]
    assert len(positive) >= 25
    first, last = sum(positive[:8]) / 8, sum(positive[-8:]) / 8
    assert last < first - 0.03, (first, last)
    assert all(float(r["fm"]) > 0 for r in rows)
    assert (tiny_run / "loss.png").stat().st_size > 1000


def test_previews_save_videos_and_log_identity_per_subject(tiny_run):
    rows = list(csv.DictReader((tiny_run / "previews" / "identity.csv").open()))
    assert sorted({int(r["step"]) for r in rows}) == [0, 20, 40]  # the baseline before training, then every 20
    subjects = {r["subject"] for r in rows}
    assert len(subjects) == 2 and all(-1 <= float(r["identity"]) <= 1 for r in rows)
    for step in (0, 20, 40):
        folder = tiny_run / "previews" / f"step-{step:06d}"
        assert (folder / "preview-0.mp4").stat().st_size > 0 and (folder / "preview-0-identity.png").is_file()
        report = json.loads((folder / "preview-0.json").read_text())
        assert [s["name"] for s in report["subjects"]] == sorted(subjects, key=[s["name"] for s in
                                                                               report["subjects"]].index)
    from PIL import Image
    assert Image.open(tiny_run / "loss.png").width > 4 * 300  # a fourth panel: identity over the steps


def test_exported_dit_loads_through_the_core_loader(tiny_run):
    dit = load_dit(tiny_run / "dit.safetensors")
    trained = load_file(tiny_run / "checkpoints" / "step-000040" / "trainable.safetensors")
    state = dit.state_dict()
    assert all(torch.equal(state[k[len("dit."):]], v) for k, v in trained.items() if k.startswith("dit."))
    assert not torch.equal(state["blocks.0.attn1.to_q.weight"], initial_dit().state_dict()["blocks.0.attn1.to_q.weight"])
    projectors = load_file(tiny_run / "projectors.safetensors")
    assert set(projectors) == {f"blocks.{b}.input_mlp.proj.{i}.weight" for b in (0,) for i in (0, 2)}
    assert projectors["blocks.0.input_mlp.proj.2.weight"].shape == (1392, 16)


@pytest.mark.parametrize("ema_decay", [None, 0.9])
def test_kill_and_resume_equals_an_uninterrupted_run(tmp_path, data, ema_decay):
    cfg = config(tmp_path, data, train={"max_steps": 20, "checkpoint_every": 5, "ema_decay": ema_decay,
                                        "keep_last": 2, "batch_size": 2})
    run(["--config", cfg, "--output-dir", tmp_path / "straight"])
    run_killed_at_checkpoint(cfg, tmp_path / "killed", 10)
    assert not (tmp_path / "killed" / "dit.safetensors").exists()
    run(["--config", cfg, "--output-dir", tmp_path / "killed", "--resume"])
    assert same_files(tmp_path / "straight" / "dit.safetensors", tmp_path / "killed" / "dit.safetensors")
    assert same_files(tmp_path / "straight" / "projectors.safetensors", tmp_path / "killed" / "projectors.safetensors")
    rows = list(csv.DictReader((tmp_path / "killed" / "log.csv").open()))
    assert [r["step"] for r in rows] == [str(i) for i in range(1, 21)] and {r["batch"] for r in rows} <= {"1", "2"}
    kept = sorted(p.name for p in (tmp_path / "straight" / "checkpoints").iterdir())
    assert kept == ["step-000015", "step-000020"]  # keep_last: 2
    last = load_file(tmp_path / "straight" / "checkpoints" / "step-000020" / "trainable.safetensors")
    exported = load_dit(tmp_path / "straight" / "dit.safetensors").state_dict()
    raw_weights_exported = all(torch.equal(v, last["dit." + k]) for k, v in exported.items())
    assert raw_weights_exported == (ema_decay is None)  # with EMA, the averaged weights are exported


def test_killed_at_random_moments_it_always_resumes_bit_exactly(tmp_path, data):
    """SIGKILL three times at random moments (start-up, caching the index, training, writing a checkpoint), resume
    each time; the last resume ends where an uninterrupted run does (tests/training/test_faults_training.py kills at each
    marker's exact rename)."""
    import random
    import time

    cfg = config(tmp_path, data, train={"max_steps": 24, "checkpoint_every": 1, "keep_last": 2})
    run(["--config", cfg, "--output-dir", tmp_path / "straight"])
    rng = random.Random(5)
    for kill in range(3):
        process = subprocess.Popen(TRAIN + ["--config", str(cfg), "--output-dir", str(tmp_path / "killed"),
                                            "--resume"], cwd=ROOT, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, env=ENV)
        time.sleep(rng.uniform(4.0, 9.0))
        process.send_signal(signal.SIGKILL)
        process.wait()
        leftovers = [p.name for p in (tmp_path / "killed" / "checkpoints").glob("*")] \
            if (tmp_path / "killed" / "checkpoints").is_dir() else []
        assert all(name.startswith("step-") for name in leftovers), leftovers
    run(["--config", cfg, "--output-dir", tmp_path / "killed", "--resume"])
    for name in ("dit.safetensors", "projectors.safetensors"):
        assert same_files(tmp_path / "straight" / name, tmp_path / "killed" / name)
    rows = [r["step"] for r in csv.DictReader((tmp_path / "killed" / "log.csv").open())]
    assert rows == [str(i) for i in range(1, 25)]


def test_vfm_online_caches_images_and_trains_through_dataloader_workers(tmp_path, data):
    cfg = config(tmp_path, data, alignment={"vfm_online": True},
                 data={"cache_dir": str(tmp_path / "cache"), "num_workers": 1},
                 train={"max_steps": 4, "checkpoint_every": 4, "batch_size": 2})
    run(["--config", cfg, "--output-dir", tmp_path / "run"])
    sample = load_file(next((tmp_path / "cache" / "samples").glob("*.safetensors")))
    assert "reference_images" in sample and "vfm_tokens" not in sample
    offline = load_file(next((data["cache"] / "samples").glob("*.safetensors")))
    assert "vfm_tokens" in offline and "reference_images" not in offline  # raw images only when online
    rows = list(csv.DictReader((tmp_path / "run" / "log.csv").open()))
    assert len(rows) == 4 and any(r["ra_pos"] for r in rows)


def test_lora_over_fp8_base_weights_exports_a_comfyui_lora(tmp_path, data):
    cfg = config(tmp_path, data, train={"max_steps": 3, "checkpoint_every": 3, "mode": "lora", "lora_rank": 4},
                 memory={"base_weights": "fp8_e4m3fn"})
    run(["--config", cfg, "--output-dir", tmp_path / "lora"])
    lora = load_file(tmp_path / "lora" / "lora.safetensors")
    assert "diffusion_model.blocks.0.self_attn.q.lora_down.weight" in lora
    assert lora["diffusion_model.blocks.2.ffn.2.lora_up.weight"].dtype == torch.float32
    assert lora["diffusion_model.blocks.2.ffn.2.lora_up.weight"].abs().max() > 0  # trained (B starts at zero)
    assert not (tmp_path / "lora" / "dit.safetensors").exists()
    checkpoint = load_file(tmp_path / "lora" / "checkpoints" / "step-000003" / "trainable.safetensors")
    assert all("lora_" in k or k.startswith("projectors.") for k in checkpoint)  # no frozen base in checkpoints
    merged = merge_lora(dit_state_dict_original(tiny_dit(0)), lora)
    assert dit_from_state_dict(merged, {"refalign.dit_config": json.dumps({"num_attention_heads": 2})}) is not None


def test_resume_refuses_changed_settings_and_takes_a_new_learning_rate(tmp_path, data):
    cfg = config(tmp_path, data, train={"max_steps": 2, "checkpoint_every": 2, "warmup_steps": 0})
    run(["--config", cfg, "--output-dir", tmp_path / "run"])
    refused = run(["--config", cfg, "--output-dir", tmp_path / "run", "--resume", "--set", "seed=1", "--set",
                   "alignment.enabled=false"], expect=2)
    assert "alignment.enabled, seed" in refused.stderr and "Traceback" not in refused.stderr
    again = run(["--config", cfg, "--output-dir", tmp_path / "run"], expect=2)
    assert "--resume" in again.stderr  # a fresh run would silently mix with the old checkpoints
    run(["--config", cfg, "--output-dir", tmp_path / "run", "--resume", "--max-steps", 4, "--set", "train.lr=0.0005"])
    rows = list(csv.DictReader((tmp_path / "run" / "log.csv").open()))
    assert [float(r["lr"]) for r in rows] == [1e-3, 1e-3, 5e-4, 5e-4]


def test_config_errors_name_the_key_before_anything_runs(tmp_path):
    (tmp_path / "bad.yaml").write_text("train:\n  lr: 1e-4\n")
    result = run(["--config", tmp_path / "bad.yaml", "--output-dir", tmp_path / "out"], expect=2)
    assert "train.lr" in result.stderr and "1.0e-4" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()  # nothing was created
    for text, needle in [("train: {learning_rate: 0.1}", "train.learning_rate"),
                         ("train: {mode: LoRA}", "train.mode"),
                         ("train: {grad_accum: 0}", "train.grad_accum"),
                         ("train: {checkpoint_every: 0}", "train.checkpoint_every"),
                         ("train: {lr: .nan}", "train.lr"),
                         ("data: {buckets: {frames: [16]}}", "data.buckets.frames[0]"),
                         ("data: {buckets: {sizes: [[100, 64]]}}", "data.buckets.sizes[0]"),
                         ("data: {datasets: [{format: webdataset, path: x}]}", "data.datasets[0].format"),
                         ("dropout: {text: 0.6, references: 0.6}", "dropout"),
                         ("memory: {base_weights: fp8_e4m3fn}", "memory.base_weights"),
                         ("model: {dit: a.safetensors, dit_config: {num_layers: 2}}", "model.dit_config"),
                         ("- just a list", "top level")]:
        (tmp_path / "c.yaml").write_text(text)
        with pytest.raises(RefAlignInputError, match=re.escape(needle)):
            load_training_config(tmp_path / "c.yaml")
    config = load_training_config(TINY, ["train.batch_size=4", "data.buckets.frames=[5, 9]"])
    assert config.train.batch_size == 4 and config.data.buckets.frames == [5, 9]
    with pytest.raises(RefAlignInputError, match="KEY=VALUE"):
        load_training_config(TINY, ["train.batch_size"])


def test_sample_prompt_errors_name_the_file_and_line(tmp_path):
    from PIL import Image
    from refalign_core.training.previews import read_sample_prompts

    Image.new("RGB", (32, 32), "red").save(tmp_path / "red.png")
    good = "a red disc --ref red.png --w 64 --h 64 --f 5 --s 2"
    (tmp_path / "ok.txt").write_text(f"# comment\n\n{good} --d 3\n")
    [prompt] = read_sample_prompts(tmp_path / "ok.txt", shift=1.0)
    assert prompt.prompt == "a red disc" and prompt.settings.seed == 3 and prompt.settings.shift == 1.0
    assert prompt.references[0].name == "red"
    for line, needle in [("a red disc --w 64", "1–4 --ref"), (f"{good} --w 65", "multiples of 16"),
                         ("a red disc --ref missing.png", "missing.png"), (f"{good} --f 6", r"4n\+1"),
                         (f"{good} --bogus 1", "unrecognized"), ("--ref red.png", "no prompt")]:
        (tmp_path / "bad.txt").write_text(f"{good}\n{line}\n")
        with pytest.raises(RefAlignInputError, match=f"bad.txt:2: .*{needle}"):
            read_sample_prompts(tmp_path / "bad.txt", shift=5.0)


def test_shipped_configs_parse():
    for path in (ROOT / "train" / "configs").glob("*.yaml"):
        config = load_training_config(path)
        assert config.train.lr > 0 and (config.model.dit or config.model.dit_config), path
        assert config.model.vae and config.model.text_encoder, path


def test_comfyui_lora_export_matches_peft_when_merged():
    from peft import LoraConfig
    base = tiny_dit(0)
    original = {k: v.clone() for k, v in dit_state_dict_original(base).items()}
    peft_model = tiny_dit(0)
    peft_model.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS))
    torch.manual_seed(1)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.1)
    exported = lora_state_dict_for_comfyui(peft_model.state_dict(), alpha=8)
    merged = dit_from_state_dict(merge_lora(original, exported),
                                 {"refalign.dit_config": json.dumps({"num_attention_heads": 2})})
    untouched = dit_from_state_dict(merge_lora(original, exported, strength=0.0),
                                    {"refalign.dit_config": json.dumps({"num_attention_heads": 2})})
    x, refs, text = torch.randn(1, 16, 2, 4, 6), torch.randn(1, 16, 1, 4, 6), torch.randn(1, 5, 32)
    with torch.no_grad():
        expected = peft_model(x, torch.tensor([500.0]), text, reference_latents=refs).sample
        got = merged(x, torch.tensor([500.0]), text, reference_latents=refs).sample
        plain = untouched(x, torch.tensor([500.0]), text, reference_latents=refs).sample
        reference = base(x, torch.tensor([500.0]), text, reference_latents=refs).sample
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert torch.equal(plain, reference) and not torch.allclose(got, reference, atol=1e-3)
    with pytest.raises(RefAlignInputError, match="wrong base model"):
        merge_lora({k: v for k, v in original.items() if not k.startswith("blocks.0.")}, exported,
                   name="my.safetensors")


def test_a_resumed_log_keeps_whole_rows_up_to_the_checkpoint(tmp_path):
    from refalign_core.training.checkpoints import drop_rows_after

    log = tmp_path / "identity.csv"
    log.write_text('step,prompt,subject,identity\n0,0,"a, b",0.5\n1,0,c,0.6\n3,0,c,0.7\n4,0,c')  # last row cut
    drop_rows_after(log, 3, ["step", "prompt", "subject", "identity"])
    assert log.read_text() == 'step,prompt,subject,identity\n0,0,"a, b",0.5\n1,0,c,0.6\n3,0,c,0.7\n'
    drop_rows_after(log, 0, ["step", "prompt", "subject", "identity"])
    assert log.read_text() == 'step,prompt,subject,identity\n0,0,"a, b",0.5\n'
    assert not list(tmp_path.glob("*.tmp"))


def test_a_resumed_log_with_other_columns_keeps_its_rows_under_the_same_names(tmp_path):
    from refalign_core.training.checkpoints import drop_rows_after

    log = tmp_path / "log.csv"
    log.write_text("step,loss,fm,lr\n1,0.5,0.5,0.1\n2,0.4,0.4,0.1\n3,0.3,0.3,0.1\n")
    drop_rows_after(log, 2, ["step", "loss", "regression", "lr"])
    assert log.read_text() == "step,loss,regression,lr\n1,0.5,,0.1\n2,0.4,,0.1\n"

