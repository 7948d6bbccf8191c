"""Training under faults: in real processes, SIGKILL at the exact rename of every "done" marker and a full disk for
each writer (RLIMIT_FSIZE: writes past the limit fail as on a full disk); a second run on a held output folder, a
`--resume` with nothing readable, and settings that are wrong for the model, each found before the feature cache is
built. Every case asserts one clear message, nothing lost, and that the run then finishes bit for bit like an
uninterrupted one."""

import json
import re
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from refalign_core.errors import RefAlignInputError
from refalign_core.files import OutputLock
from refalign_core.toy.world import make_toy_world
from refalign_core.training import load_training_config, train
from train_runs import ENV, ROOT, TRAIN, config, run, same_files

pytestmark = pytest.mark.slow

# runs train/train.py with os.replace patched: SIGKILL just before renaming onto a path that matches argv[1]
KILL_AT_RENAME = """
import os, re, runpy, signal, sys
pattern, real = re.compile(sys.argv[1]), os.replace
def replace(src, dst, *args, **kwargs):
    if pattern.search(str(dst)):
        os.kill(os.getpid(), signal.SIGKILL)
    return real(src, dst, *args, **kwargs)
os.replace = replace
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""
STEPS = 4


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """8 toy clips plus one whose video is not a video (skipped, so the cache writes a skip marker)."""
    folder = tmp_path_factory.mktemp("fault_data")
    manifest = make_toy_world(folder / "world", num_videos=8, size=64, frames=17)
    (folder / "world" / "videos" / "broken.mp4").write_bytes(b"not a video")
    lines = manifest.read_text().splitlines()
    broken = json.loads(lines[0]) | {"video": "videos/broken.mp4"}
    manifest.write_text("\n".join(lines + [json.dumps(broken)]) + "\n")
    return {"manifest": manifest, "cache": folder / "cache", "root": folder}


@pytest.fixture(scope="module")
def straight(data):
    """The uninterrupted run every faulted one must end like (its cache is the shared, complete one)."""
    out = data["root"] / "straight"
    run(["--config", settings(data["root"], data), "--output-dir", out])
    return out


def settings(folder: Path, data: dict, cache: Path | None = None, **sections) -> Path:
    sections = {"train": {"max_steps": STEPS, "checkpoint_every": 2, "keep_last": 2}} | sections
    return config(folder, {"manifest": data["manifest"], "cache": cache or data["cache"]}, **sections)


def killed_at_rename(pattern: str, args: list) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", KILL_AT_RENAME, pattern] + TRAIN[1:] + [str(a) for a in args],
                          capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=600)


def with_file_limit(limit: int):
    def limit_writes():  # a write past `limit` bytes fails with EFBIG, as a write to a full disk fails
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return limit_writes


def temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*.tmp"))


CACHE_MARKERS = [  # in the order a build writes them
    ("fingerprint", r"fingerprint\.json$"),
    ("cache sample", r"samples/[0-9a-f]{24}\.safetensors$"),
    ("skip marker", r"\.skip\.json$"),
    ("cache index", r"index\.json$"),
]


def test_a_kill_at_each_cache_marker_in_turn_resumes_with_nothing_to_delete(data, straight, tmp_path):
    """Each run picks up after the previous one's kill and is itself killed at the next marker's rename; the last
    run finishes like the uninterrupted one."""
    cfg = settings(tmp_path, data, cache=tmp_path / "cache")
    args = ["--config", cfg, "--output-dir", tmp_path / "out", "--resume"]
    for marker, pattern in CACHE_MARKERS:
        killed = killed_at_rename(pattern, args)
        assert killed.returncode == -signal.SIGKILL, (marker, killed.stderr[-2000:])
        assert temps(tmp_path / "cache"), marker  # the killed writer's temp file is there
    run(args)
    assert same_files(straight / "dit.safetensors", tmp_path / "out" / "dit.safetensors")
    assert temps(tmp_path / "cache") == []  # and cleaned up
    index = json.loads((tmp_path / "cache" / "index.json").read_text())
    assert len(index["samples"]) == 8 and index["skipped"] == 1


def test_a_kill_at_the_checkpoint_rename_resumes_bit_exactly(data, straight, tmp_path):
    cfg = settings(tmp_path, data)
    killed = killed_at_rename(r"checkpoints/step-000004$", ["--config", cfg, "--output-dir", tmp_path / "out"])
    assert killed.returncode == -signal.SIGKILL
    assert sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir()) == ["step-000002", "step-000004.tmp"]
    run(["--config", cfg, "--output-dir", tmp_path / "out", "--resume"])
    assert same_files(straight / "dit.safetensors", tmp_path / "out" / "dit.safetensors")
    assert sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir()) == ["step-000002", "step-000004"]


def test_a_kill_at_the_toy_world_manifest_leaves_no_manifest_and_the_rerun_builds_it(tmp_path):
    cfg = config(tmp_path, {"manifest": "unused", "cache": tmp_path / "cache"},
                 data={"datasets": [], "toy_world": {"num_videos": 3, "size": 64, "frames": 17}},
                 train={"max_steps": 1})
    killed = killed_at_rename(r"data/manifest\.jsonl$", ["--config", cfg, "--output-dir", tmp_path / "out"])
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "out" / "data" / "manifest.jsonl").exists()
    run(["--config", cfg, "--output-dir", tmp_path / "out", "--resume"])
    expected = make_toy_world(tmp_path / "expected", num_videos=3, size=64, frames=17)
    assert (tmp_path / "out" / "data" / "manifest.jsonl").read_text() == expected.read_text()


@pytest.mark.parametrize("writer, limit", [("cache samples", 8_000), ("checkpoint", 200_000)])
def test_a_full_disk_is_one_line_and_the_rerun_ends_bit_exactly(writer, limit, data, straight, tmp_path):
    cache = tmp_path / "cache" if writer == "cache samples" else data["cache"]
    cfg = settings(tmp_path, data, cache=cache)
    full = run(["--config", cfg, "--output-dir", tmp_path / "out"], expect=1, preexec_fn=with_file_limit(limit))
    errors = [line for line in full.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "File too large" in errors[0], full.stderr[-3000:]
    assert "Traceback" not in full.stderr
    assert temps(tmp_path) == [] and not list((tmp_path / "out").glob("checkpoints/*.tmp"))
    run(["--config", cfg, "--output-dir", tmp_path / "out", "--resume"])
    assert same_files(straight / "dit.safetensors", tmp_path / "out" / "dit.safetensors")


def test_a_second_run_on_the_same_output_folder_is_refused(data, straight, tmp_path):
    out = tmp_path / "out"
    cfg = settings(tmp_path, data)
    with OutputLock(out, "--output-dir", folder=True, name=".lock-rank0"):  # a first run holds the folder
        with pytest.raises(RefAlignInputError, match="--output-dir: .* is being written by process"):
            train(load_training_config(cfg), out)
        assert sorted(p.name for p in out.iterdir()) == [".lock-rank0"]  # the second run wrote nothing
    run(["--config", cfg, "--output-dir", out])  # the first run's lock went with it
    assert same_files(straight / "dit.safetensors", out / "dit.safetensors")
    assert not (out / ".lock-rank0").exists()


def test_resume_with_no_readable_checkpoint_stops_and_changes_nothing(data, straight, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(straight, out)
    for checkpoint in (out / "checkpoints").iterdir():
        optimizer = checkpoint / "optimizer.bin"
        optimizer.write_bytes(optimizer.read_bytes()[:-100])  # truncated
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    result = run(["--config", settings(tmp_path, data), "--output-dir", out, "--resume"], expect=2)
    assert "no checkpoint" in result.stderr and "step-000002: optimizer.bin" in result.stderr
    assert "step-000004: optimizer.bin" in result.stderr
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and not p.name.startswith(".lock")} == \
        {p: b for p, b in before.items() if not p.name.startswith(".lock")}


def test_resume_falls_back_to_the_older_checkpoint_when_the_newest_is_cut(data, straight, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(straight, out)
    (out / "dit.safetensors").unlink()
    optimizer = out / "checkpoints" / "step-000004" / "optimizer.bin"
    optimizer.write_bytes(optimizer.read_bytes()[:-100])
    result = run(["--config", settings(tmp_path, data), "--output-dir", out, "--resume"])
    assert "step-000004" in result.stderr and "optimizer.bin" in result.stderr  # the warning names the file
    assert same_files(straight / "dit.safetensors", out / "dit.safetensors")


@pytest.mark.parametrize("sections, message", [
    ({"alignment": {"blocks": [0, 7]}}, "alignment.blocks [0, 7]: the DiT has 3 blocks"),
    ({"model": {"dit_config": {"num_layers": "six"}}}, "model.dit_config"),
    ({"model": {"dit": "VAE"}}, "model.dit"),
    ({"alignment": {"init_projectors": "PROJECTORS"}}, "alignment.init_projectors"),
])
def test_model_settings_are_checked_before_the_feature_cache(sections, message, data, tmp_path):
    save_file({"w": torch.zeros(2)}, tmp_path / "projectors.safetensors")
    for section in sections.values():
        for key, value in section.items():
            if value == "VAE":
                section[key] = str(ROOT / "refalign_core" / "toy" / "models" / "refalign_toy" / "vae.safetensors")
            elif value == "PROJECTORS":
                section[key] = str(tmp_path / "projectors.safetensors")
    cfg = settings(tmp_path, data, cache=tmp_path / "cache", **sections)
    with pytest.raises(RefAlignInputError, match=re.escape(message)):
        train(load_training_config(cfg), tmp_path / "out")
    assert not (tmp_path / "cache" / "samples").exists()  # nothing was encoded


def test_an_image_above_the_decompression_bomb_limit_skips_its_clip(data, tmp_path):
    world = tmp_path / "world"
    shutil.copytree(data["manifest"].parent, world)
    lines = (world / "manifest.jsonl").read_text().splitlines()[:2]
    huge = json.loads(lines[1])
    (world / "refs" / "bomb.png").write_bytes(_png_claiming(20_000, 20_000))
    huge["references"][0]["image"] = "refs/bomb.png"
    (world / "manifest.jsonl").write_text("\n".join(lines + [json.dumps(huge)]) + "\n")
    cfg = settings(tmp_path, {"manifest": world / "manifest.jsonl"}, cache=tmp_path / "cache")
    run(["--config", cfg, "--output-dir", tmp_path / "out", "--cache-only"])
    index = json.loads((tmp_path / "cache" / "index.json").read_text())
    assert index["skipped"] == 1 and len(index["samples"]) == 2  # the bomb's clip only
    assert any(source.endswith("manifest.jsonl:3") and "bomb.png" in reason and "400000000 pixels" in reason
               for source, reason in index["skipped_examples"])


def _png_claiming(width: int, height: int) -> bytes:
    """A valid PNG header that claims `width`×`height` pixels (Pillow refuses it before decoding)."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")
