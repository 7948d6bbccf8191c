"""The bad-input tables' shared parts (each entry point has its own table, in the test folder that mirrors it):
every case is one clear error (a CLI exit code and an `error:` line, or a RefAlignInputError / ValueError from the
API) whose message names the input, raised before any output is written."""

import json
import os
import pickle
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from refalign_core.__main__ import main as cli
from refalign_core.inference.bundles import BUNDLE_FILE, read_bundle
from refalign_core.inference.pipeline import RefAlignPipeline, VAECodec
from refalign_core.inference.reference_files import save_reference_latents
from refalign_core.models.checkpoint import save_dit
from refalign_core.models.safetensors_io import read_safetensors
from refalign_core.toy import MODELS_FOLDER

from tiny_models import tiny_dit, tiny_vae

TOY = MODELS_FOLDER / "refalign_toy"


@dataclass
class Case:
    id: str
    call: Callable  # (inputs folder, output folder) -> CLI exit code, or raises
    expect: object  # an exit code, or an exception type
    message: str  # what the error must name


def make_inputs(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (48, 32), (200, 30, 30)).save(root / "ref.png")
    Image.new("L", (48, 32), 255).save(root / "mask.png")
    Image.new("L", (48, 32), 0).save(root / "empty_mask.png")
    Image.new("L", (20, 20), 255).save(root / "small_mask.png")
    (root / "not_an_image.png").write_text("hello")
    (root / "model.pt").write_bytes(pickle.dumps({"weight": 1}))
    (root / "renamed_pickle.safetensors").write_bytes(pickle.dumps({"weight": 1}, protocol=4))
    save_file({"x": torch.zeros(4)}, root / "small.safetensors")
    (root / "truncated.safetensors").write_bytes((root / "small.safetensors").read_bytes()[:-8])
    (root / "garbage.safetensors").write_bytes(b"\xff" * 64)
    save_file({"latents": torch.zeros(1)}, root / "no_keys.safetensors")
    toy = read_bundle(TOY).settings
    save_file({"reference_latents": torch.full((1, 16, 1, toy.height // 8, toy.width // 8), float("nan"))},
              root / "nan_refs.safetensors")
    save_file({"reference_latents": torch.zeros(1, 16, 1, 4, 4)}, root / "small_refs.safetensors")
    save_file({"prompt_embeds": torch.full((1, 4, 64), float("nan"))}, root / "nan_prompt.safetensors")
    make_reference_files(root, toy.width, toy.height)
    dit = tiny_dit(0, num_attention_heads=4, attention_head_dim=32)
    save_dit(dit, root / "toy_dit.safetensors")
    tensors, _ = read_safetensors(root / "toy_dit.safetensors")
    save_file(tensors, root / "no_metadata_dit.safetensors")  # 128 wide: 1, 2, 4, … heads all fit the shapes
    (root / "bad.index.json").write_text(json.dumps({"weight_map": {"a": "../outside.safetensors"}}))
    (root / "notjson.index.json").write_text("{")
    save_file({"w": torch.zeros(1)}, root / "odd_vae.safetensors", metadata={"refalign.vae_class": "os.system"})
    for name, content in {"notjson": "{", "list": "[]", "unknown": {"dit": "dit.safetensors", "colour": "red"},
                          "dit_number": {"dit": 5}, "escape": {"dit": "../toy_dit.safetensors"},
                          "defaults_list": {"dit": "dit.safetensors", "defaults": [1]},
                          "defaults_unknown": {"dit": "dit.safetensors", "defaults": {"stepz": 3}},
                          "fps_text": {"dit": "dit.safetensors", "defaults": {"fps": "fast"}},
                          "format": {"format": "other", "dit": "dit.safetensors"}}.items():
        folder = root / f"bundle_{name}"
        folder.mkdir()
        (folder / BUNDLE_FILE).write_text(content if isinstance(content, str) else json.dumps(content))
    (root / "cases").mkdir()
    for name, content in {"notjson": "[", "number": 5, "escape": [{"id": "../x", "references": ["ref.png"]}],
                          "twice": [{"id": "a", "references": ["ref.png"]}, {"id": "a", "references": ["ref.png"]}],
                          "names_text": [{"id": "a", "references": ["ref.png"], "names": "ab"}],
                          "masks_short": [{"id": "a", "references": ["ref.png", "ref.png"], "masks": [None]}],
                          "five": [{"id": "a", "references": ["ref.png"] * 5}],
                          "ref_outside": [{"id": "a", "references": ["../../etc/passwd"]}],
                          "ok": [{"id": "a", "references": ["ref.png"]}]}.items():
        (root / "cases" / f"{name}.json").write_text(content if isinstance(content, str) else json.dumps(content))
        shutil.copy(root / "ref.png", root / "cases" / "ref.png")
    (root / "a_file").write_text("not a folder")
    (root / "empty_dataset").mkdir()
    (root / "bad.jsonl").write_text("{")
    (root / "not.json").write_text("{")
    (root / "prompts.txt").write_text("a disc --ref ref.png --w 65\n")
    return root


def make_reference_files(root: Path, width: int, height: int) -> None:
    """Encoded-reference files (`reference_files`) that the toy bundle must refuse: fitted for it by another VAE
    (a tiny random one), fitted at another size, of a format version to come, with unreadable metadata."""
    grid = lambda w, h: torch.zeros(1, 16, 1, h // 8, w // 8)  # noqa: E731
    save_reference_latents(root / "other_vae_refs.safetensors", grid(width, height), width=width, height=height,
                           vae_probe=VAECodec(tiny_vae(seed=1)))
    probe = torch.ones(1, 16, 1, 4, 4)
    save_reference_latents(root / "small_size_refs.safetensors", grid(64, 64), width=64, height=64, vae_probe=probe)
    path = save_reference_latents(root / "future_refs.safetensors", grid(32, 32), width=32, height=32,
                                  vae_probe=probe)
    tensors, metadata = read_safetensors(path)
    save_file(tensors, path, metadata=metadata | {"version": "9"})
    save_file(tensors, root / "broken_meta_refs.safetensors", metadata=metadata | {"vae_probe": "{"})


def generate(*extra, ref=True):
    def call(inputs: Path, out: Path):
        args = ["generate", "--bundle", str(TOY), "--prompt", "a disc moves right", "--out", str(out / "v.mp4")]
        return cli(args + (["--ref", str(inputs / "ref.png")] if ref else []) + [str(e).format(i=inputs, o=out)
                                                                                 for e in extra])
    return call


def command(*args, run=cli):
    def call(inputs: Path, out: Path):
        return run([str(a).format(i=inputs, o=out) for a in args])
    return call


def api(function):
    return lambda inputs, out: function(inputs, out)


def toy_pipe():
    return RefAlignPipeline.from_bundle(TOY)




def node(out: Path, node_id: str, *args, **kwargs):
    """Run a node of the pack (`execute`) with ComfyUI's runtime stood in (its folders under `out`'s parent)."""
    import comfy_stubs
    from pack import load_pack, pack_nodes

    comfy_stubs.install(out.parent / "comfy")
    try:
        return pack_nodes(load_pack())[node_id].execute(*args, **kwargs).result
    finally:
        comfy_stubs.uninstall()


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def check_clear_error(case: Case, inputs: Path, out: Path, capsys) -> str:
    """Run `case`: its exit code (CLI) or exception (API) and a message naming the input. Returns the message."""
    if isinstance(case.expect, int):
        try:
            code = case.call(inputs, out)
        except SystemExit as e:  # argparse's own usage error
            code = e.code
        err = capsys.readouterr().err
        assert code == case.expect, err
        assert "Traceback" not in err and case.message.lower() in err.lower(), err
        return err
    with pytest.raises(case.expect) as raised:
        case.call(inputs, out)
    message = str(raised.value)
    assert case.message.lower() in message.lower() or re.search(case.message, message), message
    return message


def check_case(case: Case, inputs: Path, tmp_path: Path, capsys) -> None:
    """The table test: one clear error, nothing written, the inputs untouched."""
    out = tmp_path / "out"
    out.mkdir()
    before = sorted(os.listdir(inputs))
    check_clear_error(case, inputs, out, capsys)
    assert list(out.iterdir()) == []  # nothing written, not even half
    assert sorted(os.listdir(inputs)) == before


def table_test(cases: list[Case], minimum: int):
    """An entry point's table as one parametrized test (a test module binds it to a `test_` name): each case one clear
    error before any output. The table itself is checked as it is built: at least `minimum` cases, unique ids."""
    assert len(cases) >= minimum and len({c.id for c in cases}) == len(cases), [c.id for c in cases]

    @pytest.mark.parametrize("case", cases, ids=[c.id for c in cases])
    def test(case, bad_inputs, tmp_path, capsys):
        check_case(case, bad_inputs, tmp_path, capsys)

    return test


TOY_MODELS = [f"model.dit={TOY / 'dit.safetensors'}", f"model.vae={TOY / 'vae.safetensors'}",
              f"model.text_encoder={TOY / 'text_encoder'}"]
