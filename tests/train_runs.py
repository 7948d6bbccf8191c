"""Running train/train.py from the tests: the command, its environment, and tiny.yaml on the shared toy data."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

ROOT = Path(__file__).parents[1]
TRAIN = [sys.executable, str(ROOT / "train" / "train.py")]
TINY = ROOT / "train" / "configs" / "tiny.yaml"
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def run(args, expect=0, launcher=(), **kwargs):
    command = list(launcher) + (TRAIN if not launcher else TRAIN[1:]) + [str(a) for a in args]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=600, **kwargs)
    assert result.returncode == expect, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def run_killed_at_checkpoint(cfg: Path, output_dir: Path, step: int) -> None:
    """train/train.py on `cfg`, killed (SIGKILL) right after it saved the checkpoint of `step`."""
    killed = subprocess.Popen(TRAIN + ["--config", str(cfg), "--output-dir", str(output_dir)], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=ENV)
    for line in killed.stdout:
        if f"saved checkpoint step {step}" in line:
            killed.send_signal(signal.SIGKILL)
            break
    killed.wait()
    assert killed.returncode == -signal.SIGKILL


def torchrun(port):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]


def accelerate_fsdp(port):
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(ROOT / "train" / "accelerate" / "fsdp.yaml"), "--num_processes", "2", "--mixed_precision", "no",
            "--main_process_port", str(port)]


def config(tmp_path, toy, name="cfg.yaml", **sections):
    """tiny.yaml on the shared toy data and cache, with `sections` merged in."""
    cfg = yaml.safe_load(TINY.read_text())
    cfg["model"].update({key: str(ROOT / cfg["model"][key]) for key in ("vae", "text_encoder")})  # any working folder
    cfg["data"].update(datasets=[{"path": str(toy["manifest"])}], cache_dir=str(toy["cache"]))
    for section, values in sections.items():
        if isinstance(values, dict):
            cfg.setdefault(section, {}).update(values)
        else:
            cfg[section] = values
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def same_files(a: Path, b: Path) -> bool:
    x, y = load_file(a), load_file(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
