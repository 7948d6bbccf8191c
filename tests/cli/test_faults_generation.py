"""Fault injection on generation, the identity check and evaluation: every fault is one clear error (a CLI exit code
and an `error:` line, or a RefAlignInputError) that names the input, raised before the work it would spoil, and the
output location (and every input) is left exactly as it was: no new, half or changed file."""

import errno
import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import zlib
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import save_file

import refalign_core.__main__ as cli_module
import refalign_core.inference.memory as memory_module
from refalign_core.__main__ import main as cli
from refalign_core.models.checkpoint import load_dit
from refalign_core.errors import RefAlignInputError
from refalign_core.metrics.eval import main as eval_cli
from refalign_core.metrics.identity import IdentitySettings, check_identity
from refalign_core.models.lora import LoraSpec
from refalign_core.models.safetensors_io import read_safetensors
from refalign_core.inference.sampler import SamplingSettings, sample_r2v
from refalign_core.models.text_encoder import encode_prompts, load_text_encoder
from tiny_models import tiny_dit
from refalign_core.models.vae import load_vae
from refalign_core.files import OutputLock, write_atomic
from refalign_core.inference.video_io import load_image, write_video
from bad_input import TOY, Case, check_clear_error, command, generate

SMALL = ["--width", "64", "--height", "64", "--num-frames", "5", "--steps", "2"]


@dataclass
class Fault(Case):
    early: bool = False  # refused before any model is loaded


def png_header(path: Path, width: int, height: int) -> None:
    """A PNG that claims `width` x `height` and holds no pixels: Pillow reads its size without decoding."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = lambda kind, data: (struct.pack(">I", len(data)) + kind + data  # noqa: E731
                                + struct.pack(">I", zlib.crc32(kind + data)))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


def with_nan(source: Path, target: Path, key_part: str, drop: str | None = None, metadata: dict | None = None):
    """A copy of a weight file with the first tensor whose name holds `key_part` set to NaN (and `drop` left out)."""
    tensors, stored = read_safetensors(source)
    key = next((k for k in sorted(tensors) if key_part in k), None) if key_part else None
    if key is not None:
        tensors[key] = torch.full_like(tensors[key], float("nan"))
    save_file({k: v for k, v in tensors.items() if k != drop}, target, metadata=metadata or stored)


def make_fault_inputs(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (48, 32), (200, 30, 30)).save(root / "ref.png")
    (root / "link.png").symlink_to(root / "ref.png")
    png_header(root / "bomb.png", 30_000, 30_000)  # 900 M pixels: past twice Pillow's limit, its DecompressionBombError
    png_header(root / "big.png", 10_000, 10_000)  # 100 M pixels: past the limit, where Pillow only warns
    with_nan(TOY / "dit.safetensors", root / "nan_dit.safetensors", "blocks.1.ffn.0.weight")
    with_nan(TOY / "dit.safetensors", root / "no_text_embedding_dit.safetensors", "",
             drop="text_embedding.0.weight")
    with_nan(TOY / "vae.safetensors", root / "nan_vae.safetensors", "encoder.0.weight")
    with_nan(TOY / "vae.safetensors", root / "nan_decoder_vae.safetensors", "decoder.0.weight")
    _, vae_meta = read_safetensors(TOY / "vae.safetensors")
    with_nan(TOY / "vae.safetensors", root / "vae_meta_not_json.safetensors", "",
             metadata=vae_meta | {"refalign.vae_config": "{"})
    with_nan(TOY / "vae.safetensors", root / "vae_meta_unknown.safetensors", "",
             metadata=vae_meta | {"refalign.vae_config": '{"colour": 1}'})
    module = "diffusion_model.blocks.0.self_attn.q"
    save_file({f"{module}.lora_down.weight": torch.zeros(4, 128), f"{module}.lora_up.weight": torch.zeros(128, 8)},
              root / "rank_lora.safetensors")
    save_file({f"{module}.lora_down.weight": torch.full((4, 128), float("nan")),
               f"{module}.lora_up.weight": torch.zeros(128, 4)}, root / "nan_lora.safetensors")
    generator = torch.Generator().manual_seed(0)
    prompt = {"prompt_embeds": torch.randn(1, 16, 64, generator=generator),
              "negative_prompt_embeds": torch.randn(1, 16, 64, generator=generator)}
    save_file(prompt, root / "prompt.safetensors")
    save_file({k: v * 1e30 for k, v in prompt.items()}, root / "huge_prompt.safetensors")
    save_file({"reference_latents": torch.randn(1, 16, 1, 16, 16, generator=generator)},
              root / "ref_latents.safetensors")
    shutil.copytree(TOY / "text_encoder", root / "te_bad_config")
    config = json.loads((root / "te_bad_config" / "config.json").read_text())
    (root / "te_bad_config" / "config.json").write_text(json.dumps(config | {"d_model": "64"}))
    return root


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return make_fault_inputs(tmp_path_factory.mktemp("fault_inputs"))


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def snapshot(folder: Path) -> dict:
    """Every entry under `folder` with its size, modification time and content hash (links as links)."""
    out = {}
    for path in sorted(folder.rglob("*")):
        if path.is_symlink() or path.is_dir():
            out[str(path.relative_to(folder))] = os.readlink(path) if path.is_symlink() else "dir"
        else:
            stat = path.stat()
            out[str(path.relative_to(folder))] = (stat.st_size, stat.st_mtime_ns,
                                                  hashlib.sha1(path.read_bytes()).hexdigest())
    return out


def api(function):
    return lambda inputs, out: function(inputs, out)


def files(*paths):
    """--dit/--vae/--text-encoder of the toy bundle, each replaced where given (`{i}` = the fault inputs)."""
    chosen = {"--dit": TOY / "dit.safetensors", "--vae": TOY / "vae.safetensors",
              "--text-encoder": TOY / "text_encoder"} | dict(zip(paths[::2], paths[1::2]))
    return [str(x) for pair in chosen.items() for x in pair]


def identity_embedder(images: torch.Tensor) -> torch.Tensor:
    """A deterministic stand-in backbone: the mean colour of every 16x16 patch as its token."""
    return F.avg_pool2d(images, 16).flatten(2).transpose(1, 2)


CASES = [
    # 1. absurd values refused up front; non-finite latents or video never decoded or saved
    Fault("image scale 1e308", generate("--image-scale", "1e308"), 2, "image_scale", early=True),
    Fault("text scale past the bound", generate("--text-scale", "101"), 2, "text_scale", early=True),
    Fault("LoRA strength 1e308", generate("--lora", "{i}/rank_lora.safetensors:1e308"), 2, "strength", early=True),
    Fault("prompt embeddings x1e30", command("generate", "--bundle", TOY, "--prompt-embeds",
                                            "{i}/huge_prompt.safetensors", "--ref", "{i}/ref.png", "--steps", "2",
                                            "--out", "{o}/v.mp4", "--save-latents", "{o}/l.safetensors"), 2,
          "prompt embeddings (largest |value|"),
    Fault("DiT weight NaN", command("generate", *files("--dit", "{i}/nan_dit.safetensors"), "--prompt", "a disc",
                                    "--ref", "{i}/ref.png", *SMALL, "--out", "{o}/v.mp4"), 2,
          "DiT weight blocks.1.ffn"),
    Fault("VAE encoder weight NaN", command("generate", *files("--vae", "{i}/nan_vae.safetensors"), "--prompt",
                                            "a disc", "--ref", "{i}/ref.png", *SMALL, "--out", "{o}/v.mp4"), 2,
          "VAE: encoding gave NaN or infinite values; its weight encoder.0.weight"),
    Fault("VAE decoder weight NaN", command("generate", *files("--vae", "{i}/nan_decoder_vae.safetensors"),
                                            "--prompt-embeds", "{i}/prompt.safetensors", "--reference-latents",
                                            "{i}/ref_latents.safetensors", "--width", "128", "--height", "128",
                                            "--num-frames", "5", "--steps", "1", "--out", "{o}/v.mp4"), 2,
          "VAE: decoding gave NaN or infinite values; its weight decoder.0.weight"),
    Fault("LoRA weight NaN", generate("--lora", "{i}/nan_lora.safetensors"), 2, "nan_lora.safetensors"),
    Fault("video frames NaN (API)", api(lambda i, o: write_video(torch.full((2, 16, 16, 3), float("nan")),
                                                                  o / "v.mp4")), RefAlignInputError, "NaN"),
    Fault("guidance scale past the bound (API)", api(lambda i, o: SamplingSettings(image_scale=1e308)),
          RefAlignInputError, "image_scale"),
    Fault("LoRA strength past the bound (API)", api(lambda i, o: LoraSpec("x.safetensors", 1e308)),
          RefAlignInputError, "x.safetensors"),
    # 2. upper bounds, before any work
    Fault("frames past the RoPE positions", generate("--num-frames", "40001"), 2, "rope_max_seq_len", early=True),
    Fault("width past the RoPE positions", generate("--width", "65536"), 2, "width 65536", early=True),
    Fault("16384x16384x81 past the free memory", generate("--width", "16384", "--height", "16384", "--num-frames", "81"),
          2, "GB of host memory", early=True),
    Fault("shift 1e-300", generate("--shift", "1e-300"), 2, "shift", early=True),
    Fault("shift 1e12", generate("--shift", "1e12"), 2, "shift", early=True),
    Fault("frames past the RoPE positions (API)",
          api(lambda i, o: sample_r2v(tiny_dit(), torch.zeros(1, 3, 32), torch.zeros(1, 3, 32),
                                      torch.zeros(1, 16, 1, 2, 2), SamplingSettings(16, 16, num_frames=40001))),
          RefAlignInputError, "rope_max_seq_len"),
    # 3. images past Pillow's decompression-bomb limit
    Fault("reference past the bomb limit", generate("--ref", "{i}/bomb.png"), 2, "bomb.png", early=True),
    Fault("reference past the pixel limit", generate("--ref", "{i}/big.png"), 2, "10000x10000", early=True),
    Fault("image past the bomb limit (API)", api(lambda i, o: load_image(i / "bomb.png")), RefAlignInputError,
          "decompression-bomb"),
    # 4. an output that is an input
    Fault("preview is the reference", generate("--preview", "{i}/ref.png"), 2, "--preview", early=True),
    Fault("preview is a link to the reference", generate("--preview", "{i}/link.png"), 2, "--ref input",
          early=True),
    Fault("save-latents is the reference latents", command("generate", "--bundle", TOY, "--prompt", "a",
                                                           "--reference-latents", "{i}/ref_latents.safetensors",
                                                           "--save-latents", "{i}/ref_latents.safetensors"), 2,
          "--save-latents", early=True),
    Fault("encode-references out is the VAE", command("encode-references", "--vae", "{i}/prompt.safetensors",
                                                      "--ref", "{i}/ref.png", "--out", "{i}/prompt.safetensors"),
          2, "--vae input", early=True),
    # 5. frame rates each container cannot store
    Fault("fps 0.001 in a gif", generate("--fps", "0.001", "--out", "{o}/v.gif"), 2, "--fps", early=True),
    Fault("fps 200 in a gif", generate("--fps", "200", "--out", "{o}/v.gif"), 2, "--fps", early=True),
    Fault("fps too slow for an mp4", generate("--fps", "0.00001"), 2, "--fps", early=True),
    Fault("webp past 2^31 ms", generate("--fps", "0.0000597", "--num-frames", "129", "--out", "{o}/v.webp"), 2,
          "--fps", early=True),
    Fault("fps a ratio over zero", generate("--fps", "1/0"), 2, "--fps", early=True),
    # 6. an output folder that cannot be created
    Fault("out under /proc", generate("--out", "/proc/x/y/v.mp4"), 2, "/proc/x/y", early=True),
    Fault("save-latents under /proc", generate("--save-latents", "/proc/x/l.safetensors"), 2, "/proc/x",
          early=True),
    # 9. tracebacks turned into one clear error
    Fault("prompt not UTF-8", generate("--prompt", "a \udcff disc"), 2, "--prompt: not valid UTF-8", early=True),
    Fault("negative prompt not UTF-8", generate("--negative-prompt", "\udcfe"), 2, "--negative-prompt", early=True),
    Fault("encode-prompt prompt not UTF-8", command("encode-prompt", "--text-encoder", TOY / "text_encoder",
                                                    "--prompt", "a \udcff", "--out", "{o}/p.safetensors"), 2,
          "--prompt", early=True),
    Fault("DiT without text_embedding.0.weight", command("generate", *files("--dit",
                                                                             "{i}/no_text_embedding_dit.safetensors"),
                                                         "--prompt", "a", "--ref", "{i}/ref.png", *SMALL, "--out",
                                                         "{o}/v.mp4"), 2, "text_embedding.0.weight", early=True),
    Fault("DiT without text_embedding.0.weight (API)", api(lambda i, o: load_dit(
        i / "no_text_embedding_dit.safetensors")), RefAlignInputError, "text_embedding.0.weight"),
    Fault("text encoder config of a wrong type", command("encode-prompt", "--text-encoder", "{i}/te_bad_config",
                                                         "--prompt", "a", "--out", "{o}/p.safetensors"), 2,
          "config.json"),
    Fault("VAE metadata not JSON", command("encode-references", "--vae", "{i}/vae_meta_not_json.safetensors",
                                           "--ref", "{i}/ref.png", "--width", "64", "--height", "64", "--out",
                                           "{o}/r.safetensors"), 2, "refalign.vae_config"),
    Fault("VAE metadata an unknown config (API)", api(lambda i, o: load_vae(i / "vae_meta_unknown.safetensors")),
          RefAlignInputError, "vae_meta_unknown.safetensors"),
    Fault("LoRA rank mismatch", generate("--lora", "{i}/rank_lora.safetensors"), 2, "same rank"),
    # 8. the identity check's frames
    Fault("identity frames int64 (API)", api(lambda i, o: check_identity(
        [torch.rand(32, 32, 3)], torch.zeros(3, 32, 32, 3, dtype=torch.int64), identity_embedder)),
          RefAlignInputError, "int64"),
    Fault("identity frames 0-255 floats (API)", api(lambda i, o: check_identity(
        [torch.rand(32, 32, 3)], torch.full((3, 32, 32, 3), 200.0), identity_embedder)),
          RefAlignInputError, "0-255"),
]


def test_the_cases_are_distinct():
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_fault_is_one_clear_error_and_writes_nothing(case, inputs, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    if case.early:  # everything wrong with the command is found before a model is loaded
        monkeypatch.setattr(cli_module, "load_pipeline", lambda *a: pytest.fail("a model was loaded"))
        monkeypatch.setattr(cli_module, "load_vae", lambda *a, **k: pytest.fail("a VAE was loaded"))
        monkeypatch.setattr(cli_module, "load_text_encoder", lambda *a, **k: pytest.fail("a model was loaded"))
    before_inputs, before_out = snapshot(inputs), snapshot(out)
    message = check_clear_error(case, inputs, out, capsys)
    if isinstance(case.expect, int):
        assert sum("error:" in line for line in message.splitlines()) == 1, message
    assert snapshot(out) == before_out  # nothing written, not even half
    assert snapshot(inputs) == before_inputs
    if case.early:
        assert list(out.iterdir()) == []  # not even a lock


def test_a_run_past_free_memory_is_refused_with_the_numbers(inputs, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(memory_module, "available_memory", lambda device="cpu": 1_000_000)
    monkeypatch.setattr(cli_module, "load_pipeline", lambda *a: pytest.fail("a model was loaded"))
    code = cli(["generate", "--bundle", str(TOY), "--prompt", "a disc", "--ref", str(inputs / "ref.png"),
                "--out", str(tmp_path / "v.mp4")])
    err = capsys.readouterr().err
    assert code == 2 and "128x128x5" in err and "GB of host memory" in err and "0.0 GB is free" in err, err
    assert list(tmp_path.iterdir()) == []


def test_the_memory_check_counts_the_joined_video_of_many_segments(inputs, tmp_path, capsys, monkeypatch):
    """64 segments of 5 frames overlapping by 1 decode a 257-frame video: 0.15 GB more than one segment's."""
    monkeypatch.setattr(memory_module, "available_memory", lambda device="cpu": 1)
    monkeypatch.setattr(cli_module, "load_pipeline", lambda *a: pytest.fail("a model was loaded"))
    needs = []
    for segments in ("1", "64"):
        assert cli(["generate", "--bundle", str(TOY), "--prompt", "a disc", "--ref", str(inputs / "ref.png"),
                    "--segments", segments, "--overlap", "1", "--out", str(tmp_path / "v.mp4")]) == 2
        err = capsys.readouterr().err
        needs.append(float(re.search(r"needs at least ([0-9.]+) GB", err).group(1)))
    assert needs[1] - needs[0] >= 0.1, needs
    assert list(tmp_path.iterdir()) == []


def test_refusing_a_16384_cube_allocates_nothing(inputs, tmp_path):
    script = ("import resource, sys; from refalign_core.__main__ import main; code = main(sys.argv[1:]); "
              "print(code, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    result = subprocess.run([sys.executable, "-c", script, "generate", "--bundle", str(TOY), "--prompt", "a disc",
                             "--ref", str(inputs / "ref.png"), "--width", "16384", "--height", "16384", "--num-frames",
                             "81", "--out", str(tmp_path / "v.mp4")], capture_output=True, text=True, timeout=120)
    code, peak_kb = result.stdout.split()
    assert code == "2" and "GB of host memory" in result.stderr, result.stderr
    assert int(peak_kb) < 1_000_000, f"peak {int(peak_kb) / 1e6:.2f} GB"  # imports alone: ~0.5 GB
    assert list(tmp_path.iterdir()) == []


def test_a_second_writer_of_an_output_is_refused_before_any_work(inputs, tmp_path, capsys, monkeypatch):
    out = tmp_path / "v.mp4"
    args = ["generate", "--bundle", str(TOY), "--prompt", "a disc", "--ref", str(inputs / "ref.png"), "--steps", "1",
            "--out", str(out)]
    with monkeypatch.context() as patch, OutputLock(out, "--out"):  # the first writer, mid-run
        patch.setattr(cli_module, "load_pipeline", lambda *a: pytest.fail("a model was loaded"))
        assert cli(args) == 2
        err = capsys.readouterr().err
        assert f"--out: {out} is being written by process {os.getpid()}" in err, err
        assert names(tmp_path) == [".v.mp4.lock"]  # the first writer's lock, nothing of the second
    assert cli(args) == 0  # the first writer is done, and its lock released
    assert names(tmp_path) == ["v.mp4"]  # and no lock file is left


def test_video_temp_names_are_unique_and_never_the_output(tmp_path, monkeypatch):
    target = tmp_path / "v.gif"
    used = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: used.append(Path(a)) or real_replace(a, b))
    write_video(torch.rand(2, 16, 16, 3), target, fps=8)
    write_video(torch.rand(2, 16, 16, 3), target, fps=8)
    assert len(set(used)) == 2 and target not in used
    assert all(n.name.startswith(".v.gif.") and str(os.getpid()) in n.name for n in used)
    assert names(tmp_path) == ["v.gif"] and Image.open(target).n_frames == 2


def test_a_full_disk_while_writing_a_video_leaves_no_half_file(tmp_path, monkeypatch):
    def full_disk(image, path, **options):
        Path(path).write_bytes(b"GIF89a")
        raise OSError(errno.ENOSPC, "No space left on device")

    (tmp_path / "old.gif").write_bytes(b"old")
    monkeypatch.setattr(Image.Image, "save", full_disk)
    for name in ("old.gif", "new.gif"):
        with pytest.raises(OSError, match="No space"):
            write_video(torch.rand(2, 16, 16, 3), tmp_path / name, fps=8)
    assert names(tmp_path) == ["old.gif"] and (tmp_path / "old.gif").read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("command_line", [
    ["encode-references", "--vae", str(TOY / "vae.safetensors"), "--ref", "{i}/ref.png", "--width", "64",
     "--height", "64", "--out", "{o}/r.safetensors"],
    ["generate", "--bundle", str(TOY), "--prompt", "a disc", "--ref", "{i}/ref.png", "--steps", "1",
     "--save-latents", "{o}/l.safetensors"],
], ids=["encode-references", "save-latents"])
def test_a_full_disk_while_saving_tensors_is_one_line_and_exit_1(command_line, inputs, tmp_path, capsys,
                                                                  monkeypatch):
    def full_disk(tensors, path, metadata=None):
        Path(path).write_bytes(b"\0" * 10)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr("refalign_core.models.safetensors_io.save_file", full_disk)
    code = cli([a.format(i=inputs, o=tmp_path) for a in command_line])
    err = capsys.readouterr().err
    assert code == 1 and "No space left" in err and "Traceback" not in err, err
    assert names(tmp_path) == []


def test_fractional_frame_rates_are_stored_exactly(inputs, tmp_path):
    frames = torch.rand(9, 16, 16, 3)
    for fps, rate in ((23.976, Fraction(2997, 125)), (0.5, Fraction(1, 2)), (Fraction(24000, 1001), None)):
        path = write_video(frames, tmp_path / f"{float(fps)}.mp4", fps=fps)
        with av.open(str(path)) as container:
            assert container.streams.video[0].average_rate == (rate or fps)
    for suffix, fps, total_ms in ((".gif", 16, 560), (".webp", 30, 300), (".gif", 0.01, 900_000)):
        image = Image.open(write_video(frames, tmp_path / f"v{fps}{suffix}", fps=fps))
        delays = []
        for index in range(image.n_frames):
            image.seek(index)
            image.load()
            delays.append(image.info["duration"])
        assert sum(delays) == total_ms and max(delays) - min(delays) <= 10, delays
    code = cli(["generate", "--bundle", str(TOY), "--prompt", "a disc moves right", "--ref", str(inputs / "ref.png"),
                "--steps", "1", "--fps", "24000/1001", "--out", str(tmp_path / "run" / "v.mp4"), "--preview",
                str(tmp_path / "run" / "p.png"), "--save-latents", str(tmp_path / "run" / "l.safetensors")])
    assert code == 0
    with av.open(str(tmp_path / "run" / "v.mp4")) as container:
        assert container.streams.video[0].average_rate == Fraction(24000, 1001)
    assert names(tmp_path / "run") == ["l.safetensors", "p.png", "v.mp4"]


def test_unknown_words_are_named(caplog):
    encoder = load_text_encoder(TOY / "text_encoder")
    with caplog.at_level("WARNING", logger="refalign_core.models.text_encoder"):
        encode_prompts(encoder, ["a cat jumps over a dog"])
    assert "4 word(s)" in caplog.text and "cat, jumps, over, dog" in caplog.text, caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="refalign_core.models.text_encoder"):
        encode_prompts(encoder, ["a disc moves right"])
    assert caplog.text == ""


def test_uint8_frames_score_as_their_float_values():
    generator = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 256, (4, 32, 48, 3), dtype=torch.uint8, generator=generator)
    reference = [torch.rand(32, 32, 3, generator=generator)]
    settings = IdentitySettings(sample_frames=4)
    as_uint8 = check_identity(reference, frames, identity_embedder, settings=settings)
    as_float = check_identity(reference, frames.float() / 255, identity_embedder, settings=settings)
    assert as_uint8.to_dict() == as_float.to_dict()
    white = check_identity(reference, torch.ones(4, 32, 48, 3), identity_embedder, settings=settings)
    assert white.overall != as_uint8.overall  # what uint8 frames used to be scored as


def write_eval_case(root: Path, cases: list[dict]) -> Path:
    (root / "videos").mkdir(parents=True, exist_ok=True)
    for name in ("ok", "a1", "bomb"):
        write_video(torch.rand(3, 32, 32, 3, generator=torch.Generator().manual_seed(1)),
                    root / "videos" / f"{name}.mp4", fps=8)
    (root / "cases.json").write_text(json.dumps(cases))
    return root / "cases.json"


def test_eval_records_a_bad_case_and_goes_on_with_exact_video_names(inputs, tmp_path, capsys):
    shutil.copy(inputs / "ref.png", tmp_path / "ref.png")
    png_header(tmp_path / "bomb.png", 30_000, 30_000)
    cases = write_eval_case(tmp_path, [{"id": "ok", "references": ["ref.png"]},
                                       {"id": "bomb", "references": ["bomb.png"]},
                                       {"id": "a[1]", "references": ["ref.png"]}])
    out = tmp_path / "report"
    assert eval_cli(["--cases", str(cases), "--videos", str(tmp_path / "videos"), "--out", str(out),
                     "--sample-frames", "2"]) == 0
    rows = {row.split(",")[0]: row for row in (out / "summary.csv").read_text().splitlines()[1:]}
    assert rows["ok"].startswith("ok,ok,")
    assert "failed" in rows["bomb"] and "bomb.png" in rows["bomb"] and "pixels" in rows["bomb"]
    assert "failed" in rows["a[1]"] and "no video named a[1]" in rows["a[1]"]  # not a1.mp4's score
    assert "1/3 ok" in (out / "summary.md").read_text()
    assert sorted(p.name for p in (out / "cases").iterdir()) == ["ok.json"]
    assert all(not p.name.startswith(".") for p in out.rglob("*"))


def test_eval_write_failures_exit_1_and_leave_no_empty_report(inputs, tmp_path, capsys, monkeypatch):
    shutil.copy(inputs / "ref.png", tmp_path / "ref.png")
    cases = write_eval_case(tmp_path, [{"id": "ok", "references": ["ref.png"]},
                                       {"id": "missing", "references": ["ref.png"]}])
    def full_disk_for(hit):
        def write(path, data):
            if hit(Path(path)):
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
            return write_atomic(path, data)
        return write

    out = tmp_path / "report"
    args = ["--cases", str(cases), "--videos", str(tmp_path / "videos"), "--out", str(out), "--sample-frames", "2"]
    monkeypatch.setattr("refalign_core.metrics.eval.write_atomic",
                        full_disk_for(lambda path: path.parent.name == "cases"))
    assert eval_cli(args) == 1
    err = capsys.readouterr().err
    assert "error: 1 case report(s) could not be written" in err and "No space" in err, err
    assert "No space left" in (out / "summary.csv").read_text()  # the case is failed, with its reason
    assert not (out / "cases" / "ok.json").exists() and not (out / "sheets" / "ok.png").exists()
    shutil.rmtree(out)
    monkeypatch.setattr("refalign_core.metrics.eval.write_atomic",
                        full_disk_for(lambda path: path.name.startswith("summary")))
    (tmp_path / "videos" / "ok.mp4").unlink()
    assert eval_cli(args) == 1
    assert "error:" in capsys.readouterr().err
    assert not (out / "summary.csv").exists() and not (out / "summary.md").exists()
    assert all(not p.name.startswith(".") for p in out.rglob("*"))
