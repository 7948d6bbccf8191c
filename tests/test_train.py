import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from refalign_core.checkpoint import dit_from_state_dict, dit_state_dict_original, load_dit
from refalign_core.errors import RefAlignInputError
from refalign_core.lora import merge_lora
from refalign_core.tiny import tiny_dit
from refalign_core.training import LORA_TARGETS, lora_state_dict_for_comfyui

ROOT = Path(__file__).parents[1]
TRAIN = [sys.executable, str(ROOT / "train" / "train.py")]
TINY = ROOT / "train" / "configs" / "tiny.yaml"


def run(args, **kwargs):
    result = subprocess.run(TRAIN + [str(a) for a in args], capture_output=True, text=True, cwd=ROOT, **kwargs)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def config(tmp_path, name="cfg.yaml", **sections):
    cfg = yaml.safe_load(TINY.read_text())
    for section, values in sections.items():
        if isinstance(values, dict):
            cfg[section].update(values)
        else:
            cfg[section] = values
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_run")
    run(["--config", TINY, "--output-dir", out, "--max-steps", 40])
    return out


def test_tiny_recipe_trains_and_the_ra_loss_decreases(tiny_run):
    rows = list(csv.DictReader((tiny_run / "log.csv").open()))
    assert [int(r["step"]) for r in rows] == list(range(1, 41))
    positive = [float(r["ra_pos"]) for r in rows if r["ra_pos"]]
    assert len(positive) >= 25
    first, last = sum(positive[:8]) / 8, sum(positive[-8:]) / 8
    assert last < first - 0.03, (first, last)
    assert (tiny_run / "loss.png").stat().st_size > 1000
    assert all(float(r["fm"]) > 0 for r in rows)


def test_exported_dit_loads_through_the_core_loader(tiny_run):
    dit = load_dit(tiny_run / "dit.safetensors")
    trained = load_file(tiny_run / "checkpoints" / "step-000040" / "trainable.safetensors")
    state = dit.state_dict()
    assert all(torch.equal(state[k[len("dit."):]], v) for k, v in trained.items() if k.startswith("dit."))
    assert not torch.equal(state["blocks.0.attn1.to_q.weight"], tiny_dit(0).state_dict()["blocks.0.attn1.to_q.weight"])
    projectors = load_file(tiny_run / "projectors.safetensors")
    assert set(projectors) == {f"blocks.{b}.input_mlp.proj.{i}.weight" for b in (0,) for i in (0, 2)}
    assert projectors["blocks.0.input_mlp.proj.2.weight"].shape == (1392, 16)


@pytest.mark.parametrize("ema_decay", [None, 0.9])
def test_kill_and_resume_equals_an_uninterrupted_run(tmp_path, tiny_run, ema_decay):
    cfg = config(tmp_path, train={"max_steps": 20, "checkpoint_every": 5, "ema_decay": ema_decay},
                 data={"manifest": str(tiny_run / "data" / "manifest.jsonl"), "cache_dir": str(tiny_run / "cache")})
    run(["--config", cfg, "--output-dir", tmp_path / "straight"])
    killed = subprocess.Popen(TRAIN + ["--config", str(cfg), "--output-dir", str(tmp_path / "killed")], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in killed.stdout:
        if "saved checkpoint step 10" in line:
            killed.send_signal(signal.SIGKILL)
            break
    killed.wait()
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed" / "dit.safetensors").exists()
    run(["--config", cfg, "--output-dir", tmp_path / "killed", "--resume"])
    a = load_file(tmp_path / "straight" / "dit.safetensors")
    b = load_file(tmp_path / "killed" / "dit.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    pa = load_file(tmp_path / "straight" / "projectors.safetensors")
    pb = load_file(tmp_path / "killed" / "projectors.safetensors")
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    rows = [r.split(",")[0] for r in (tmp_path / "killed" / "log.csv").read_text().splitlines()[1:]]
    assert rows == [str(i) for i in range(1, 21)]
    last = load_file(tmp_path / "straight" / "checkpoints" / "step-000020" / "trainable.safetensors")
    exported = load_dit(tmp_path / "straight" / "dit.safetensors").state_dict()
    assert all("dit." + k in last for k in exported)
    raw_weights_exported = all(torch.equal(v, last["dit." + k]) for k, v in exported.items())
    assert raw_weights_exported == (ema_decay is None)  # with EMA, the averaged weights are exported


def test_two_process_ddp_on_cpu(tmp_path, tiny_run):
    cfg = config(tmp_path, train={"max_steps": 4, "checkpoint_every": 4},
                 data={"manifest": str(tiny_run / "data" / "manifest.jsonl"), "cache_dir": str(tiny_run / "cache")})
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--cpu", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "train" / "train.py"),
         "--config", str(cfg), "--output-dir", str(tmp_path / "ddp")],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("exported to") == 1  # only rank 0 writes
    single = tmp_path / "single"
    run(["--config", cfg, "--output-dir", single])
    a, b = load_file(tmp_path / "ddp" / "dit.safetensors"), load_file(single / "dit.safetensors")
    # two ranks see different samples and average their gradients: a different model than one process
    assert not all(torch.equal(a[k], b[k]) for k in a)
    assert load_dit(tmp_path / "ddp" / "dit.safetensors") is not None


def test_lora_mode_exports_comfyui_lora(tmp_path, tiny_run):
    cfg = config(tmp_path, train={"max_steps": 3, "checkpoint_every": 3, "mode": "lora"},
                 data={"manifest": str(tiny_run / "data" / "manifest.jsonl"), "cache_dir": str(tiny_run / "cache")})
    run(["--config", cfg, "--output-dir", tmp_path / "lora"])
    lora = load_file(tmp_path / "lora" / "lora.safetensors")
    assert "diffusion_model.blocks.0.self_attn.q.lora_down.weight" in lora
    assert "diffusion_model.blocks.2.ffn.2.lora_up.weight" in lora
    assert not (tmp_path / "lora" / "dit.safetensors").exists()


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
    exported = lora_state_dict_for_comfyui(peft_model, alpha=8)
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
        merge_lora({k: v for k, v in original.items() if not k.startswith("blocks.0.")}, exported, name="my.safetensors")


def test_shipped_configs_use_known_keys_and_typos_are_refused(tmp_path):
    import importlib.util
    spec = importlib.util.spec_from_file_location("train_script", ROOT / "train" / "train.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    for path in (ROOT / "train" / "configs").glob("*.yaml"):
        cfg = script.load_config(path)
        assert cfg["train"]["lr"] > 0 and "text_length" in cfg
    (tmp_path / "typo.yaml").write_text("train:\n  learning_rate: 0.1\n")
    with pytest.raises(RefAlignInputError, match="train.learning_rate"):
        script.load_config(tmp_path / "typo.yaml")
