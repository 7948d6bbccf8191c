"""Training on 2 CPU processes (gloo) resumes bit-exactly: DDP through torchrun, FSDP2 through `accelerate launch`
(in a file of its own, so that a parallel test run gives it its own worker)."""

import pytest
import torch
from safetensors.torch import load_file

from train_runs import accelerate_fsdp, config, run, same_files, torchrun


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["ddp", "fsdp"])
def test_two_processes_resume_bit_exactly(tmp_path, data, launcher):
    """2 CPU processes (gloo): DDP through torchrun, FSDP2 through `accelerate launch` with the shipped config."""
    port = 29611 if launcher == "ddp" else 29621
    launch = torchrun(port) if launcher == "ddp" else accelerate_fsdp(port)
    fresh_cache = {"cache_dir": str(tmp_path / "cache")} if launcher == "ddp" else {}
    cfg = config(tmp_path, data, train={"checkpoint_every": 3, "ema_decay": 0.9}, data=fresh_cache)
    straight = run(["--config", cfg, "--output-dir", tmp_path / "straight", "--max-steps", 6], launcher=launch)
    assert straight.stdout.count("exported to") == 1  # only the main process writes
    assert f"{'FSDP' if launcher == 'fsdp' else 'MULTI_CPU'} on 2 processes" in straight.stderr
    if fresh_cache:  # both processes encoded their share of the clips, after an estimate of the cache's size
        assert "8 of 8 clips to encode, about" in straight.stderr
        assert all(len((tmp_path / "cache" / f"records-{r}.jsonl").read_text().splitlines()) == 4 for r in (0, 1))
    run(["--config", cfg, "--output-dir", tmp_path / "resumed", "--max-steps", 3], launcher=launch)
    run(["--config", cfg, "--output-dir", tmp_path / "resumed", "--max-steps", 6, "--resume"], launcher=launch)
    for name in ("dit.safetensors", "projectors.safetensors"):
        assert same_files(tmp_path / "straight" / name, tmp_path / "resumed" / name)
    if launcher == "fsdp":
        assert (tmp_path / "resumed" / "checkpoints" / "step-000006" / "pytorch_model_fsdp_0").is_dir()  # sharded
    run(["--config", cfg, "--output-dir", tmp_path / "single", "--max-steps", 6])
    a, b = load_file(tmp_path / "straight" / "dit.safetensors"), load_file(tmp_path / "single" / "dit.safetensors")
    # two processes see different clips and average their gradients: another model than one process trains
    assert not all(torch.equal(a[k], b[k]) for k in a)
