"""Bad input, table-driven: every case is one clear error (a CLI exit code and an `error:` line, or a
RefAlignInputError / ValueError from the API) whose message names the input, raised before any output is written.
Plus the inputs that used to give a silent wrong result, and memory on an 8000×8000 reference."""

import json
import math
import os
import pickle
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from refalign_core.__main__ import main as cli
from refalign_core.inference.bundles import BUNDLE_FILE, read_bundle
from refalign_core.models.checkpoint import load_dit, save_dit
from refalign_core.errors import RefAlignInputError
from refalign_core.metrics.eval import main as eval_cli
from refalign_core.metrics.identity import check_identity
from refalign_core.inference.pipeline import RefAlignPipeline
from refalign_core.inference.references import Reference, fit_on_white, prepare_references, to_chw
from refalign_core.models.safetensors_io import read_safetensors
from refalign_core.toy import MODELS_FOLDER
from tiny_models import tiny_dit
from refalign_core.training import load_training_config, train
from refalign_core.training.data import SkipCounter
from refalign_core.training.datasets import read_folder, read_jsonl, read_opens2v
from refalign_core.training.previews import read_sample_prompts
from refalign_core.models.vae import load_vae
from refalign_core.inference.video_io import load_image, write_video

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


CASES = [
    # generate: sizes, numbers and choices
    Case("width 0", generate("--width", "0"), 2, "width"),
    Case("width negative", generate("--width", "-16"), 2, "width"),
    Case("width not a multiple of 16", generate("--width", "100"), 2, "multiples of 16"),
    Case("frames not 4n+1", generate("--num-frames", "6"), 2, "4n+1"),
    Case("steps 0", generate("--steps", "0"), 2, "steps"),
    Case("shift nan", generate("--shift", "nan"), 2, "shift"),
    Case("shift 0", generate("--shift", "0"), 2, "shift"),
    Case("image scale nan", generate("--image-scale", "nan"), 2, "image_scale"),
    Case("text scale inf", generate("--text-scale", "inf"), 2, "text_scale"),
    Case("seed negative", generate("--seed", "-1"), 2, "seed"),
    Case("seed 2^64", generate("--seed", str(2 ** 64)), 2, "seed"),
    Case("guidance steps above steps", generate("--steps", "4", "--guidance-steps", "9"), 2, "guidance_steps"),
    Case("cache threshold negative", generate("--cache", "magcache", "--cache-threshold", "-1"), 2,
         "cache_threshold"),
    Case("sampler unknown", generate("--sampler", "ddim"), 2, "sampler"),
    Case("device without CUDA", generate("--device", "cuda"), 2, "--device cuda"),
    Case("device not a device", generate("--device", "gpu7"), 2, "--device"),
    # generate: outputs, checked before any model loads
    Case("out with an unknown suffix", generate("--out", "{o}/v.avi"), 2, "--out"),
    Case("out under a file", generate("--out", "{i}/a_file/v.mp4"), 2, "a_file"),
    Case("out is a folder", generate("--out", "{o}"), 2, "--out"),
    Case("fps 0", generate("--fps", "0"), 2, "--fps"),
    Case("fps nan", generate("--fps", "nan"), 2, "--fps"),
    Case("save-latents not safetensors", generate("--save-latents", "{o}/l.pt"), 2, "--save-latents"),
    Case("preview not png", generate("--preview", "{o}/p.jpg"), 2, "--preview"),
    Case("nothing to write", command("generate", "--bundle", TOY, "--prompt", "a", "--ref", "{i}/ref.png"), 2,
         "--out"),
    Case("no prompt", command("generate", "--bundle", TOY, "--ref", "{i}/ref.png", "--out", "{o}/v.mp4"), 2,
         "--prompt"),
    Case("no references", generate(ref=False), 2, "--ref"),
    # generate: references and masks
    Case("five references", generate(*["--ref", "{i}/ref.png"] * 4), 2, "at most 4"),
    Case("reference missing", generate("--ref", "{i}/missing.png"), 2, "missing.png"),
    Case("reference not an image", generate("--ref", "{i}/not_an_image.png"), 2, "not_an_image.png"),
    Case("more masks than references", generate("--mask", "{i}/mask.png", "--mask", "{i}/mask.png"), 2, "--mask"),
    Case("mask of another size", generate("--mask", "{i}/small_mask.png"), 2, "mask"),
    Case("mask empty", generate("--mask", "{i}/empty_mask.png"), 2, "mask is empty"),
    # generate: model files
    Case("dit missing", command("generate", "--dit", "{i}/none.safetensors", "--prompt", "a", "--ref",
                                "{i}/ref.png", "--out", "{o}/v.mp4"), 2, "none.safetensors"),
    Case("dit is a pickle", command("generate", "--dit", "{i}/model.pt", "--prompt", "a", "--ref", "{i}/ref.png",
                                    "--save-latents", "{o}/l.safetensors"), 2, "pickle"),
    Case("dit is a renamed pickle", command("generate", "--dit", "{i}/renamed_pickle.safetensors", "--prompt", "a",
                                            "--ref", "{i}/ref.png", "--save-latents", "{o}/l.safetensors"), 2,
         "pickle"),
    Case("dit truncated", command("generate", "--dit", "{i}/truncated.safetensors", "--prompt", "a", "--ref",
                                  "{i}/ref.png", "--save-latents", "{o}/l.safetensors"), 2, "truncated"),
    Case("dit garbage", command("generate", "--dit", "{i}/garbage.safetensors", "--prompt", "a", "--ref",
                                "{i}/ref.png", "--save-latents", "{o}/l.safetensors"), 2, "garbage.safetensors"),
    Case("dit heads unknowable", command("generate", "--dit", "{i}/no_metadata_dit.safetensors", "--prompt-embeds",
                                         "{i}/nan_prompt.safetensors", "--reference-latents",
                                         "{i}/small_refs.safetensors", "--width", "32", "--height", "32",
                                         "--save-latents", "{o}/l.safetensors"), 2, "head"),
    Case("vae missing", command("generate", "--dit", "{i}/toy_dit.safetensors", "--vae", "{i}/none.safetensors",
                                "--prompt", "a", "--ref", "{i}/ref.png", "--out", "{o}/v.mp4"), 2, "--vae"),
    Case("lora missing", generate("--lora", "{i}/none.safetensors"), 2, "none.safetensors"),
    Case("prompt embeds without the key", command("generate", "--bundle", TOY, "--prompt-embeds",
                                                  "{i}/no_keys.safetensors", "--ref", "{i}/ref.png", "--out",
                                                  "{o}/v.mp4"), 2, "prompt_embeds"),
    Case("reference latents without the key", generate("--reference-latents", "{i}/no_keys.safetensors"), 2,
         "reference_latents"),
    Case("reference latents NaN", command("generate", "--bundle", TOY, "--prompt", "a", "--reference-latents",
                                          "{i}/nan_refs.safetensors", "--out", "{o}/v.mp4"), 2, "NaN"),
    Case("reference latents of another size", command("generate", "--bundle", TOY, "--prompt", "a",
                                                      "--reference-latents", "{i}/small_refs.safetensors", "--out",
                                                      "{o}/v.mp4"), 2, "reference latents"),
    Case("prompt embeds NaN", command("generate", "--bundle", TOY, "--prompt-embeds", "{i}/nan_prompt.safetensors",
                                      "--ref", "{i}/ref.png", "--out", "{o}/v.mp4"), 2, "NaN"),
    # bundles
    Case("bundle missing", command("generate", "--bundle", "{i}/nowhere", "--prompt", "a", "--ref", "{i}/ref.png",
                                   "--out", "{o}/v.mp4"), 2, "nowhere"),
    Case("bundle and a VAE file", command("generate", "--bundle", TOY, "--vae", TOY / "vae.safetensors", "--prompt",
                                          "a", "--ref", "{i}/ref.png", "--out", "{o}/v.mp4"), 2, "vae: a bundle folder"),
    *[Case(f"bundle {name}", command("generate", "--bundle", f"{{i}}/bundle_{name}", "--prompt", "a", "--ref",
                                     "{i}/ref.png", "--out", "{o}/v.mp4"), 2, needle)
      for name, needle in [("notjson", "not a readable JSON"), ("list", "JSON object"), ("unknown", "colour"),
                           ("dit_number", "dit"), ("escape", "points outside"), ("defaults_list", "defaults"),
                           ("defaults_unknown", "stepz"), ("fps_text", "fps"), ("format", "format")]],
    # encode commands and the demo
    Case("encode-references size", command("encode-references", "--vae", "{i}/none.safetensors", "--ref",
                                           "{i}/ref.png", "--width", "30", "--out", "{o}/r.safetensors"), 2, "width"),
    Case("encode-references out suffix", command("encode-references", "--vae", TOY / "vae.safetensors", "--ref",
                                                 "{i}/ref.png", "--out", "{o}/r.pt"), 2, "--out"),
    Case("encode-prompt device", command("encode-prompt", "--text-encoder", TOY / "text_encoder", "--prompt", "a",
                                         "--device", "cuda", "--out", "{o}/p.safetensors"), 2, "--device"),
    Case("demo out under a file", command("demo", "--out", "{i}/a_file/demo"), 2, "a_file"),
    Case("demo seed", command("demo", "--out", "{o}/demo", "--seed", "-3"), 2, "seed"),
    # Python API
    Case("references one [H,W,3] tensor", api(lambda i, o: toy_pipe()("a", torch.rand(32, 48, 3))),
         RefAlignInputError, r"\[K,H,W,C\]"),
    Case("references empty", api(lambda i, o: toy_pipe()("a", [])), RefAlignInputError, "at least one"),
    Case("reference NaN image", api(lambda i, o: toy_pipe()("a", [torch.full((32, 48, 3), float("nan"))])),
         RefAlignInputError, "NaN"),
    Case("reference too large", api(lambda i, o: to_chw(Image.new("L", (10_000, 10_000)), "big")),
         RefAlignInputError, "big"),
    Case("prompt embeds NaN (API)", api(lambda i, o: toy_pipe()(prompt_embeds=torch.full((1, 4, 64), math.nan),
                                                              references=[torch.rand(32, 48, 3)])),
         RefAlignInputError, "prompt embeddings"),
    Case("seed text", api(lambda i, o: toy_pipe()("a", [torch.rand(32, 48, 3)], seed="7")), RefAlignInputError,
         "seed"),
    Case("setting unknown", api(lambda i, o: toy_pipe()("a", [torch.rand(32, 48, 3)], colour=1)),
         RefAlignInputError, "colour"),
    Case("DiT timestep batch", api(lambda i, o: tiny_dit()(torch.zeros(2, 16, 1, 4, 4), torch.zeros(3),
                                                           torch.zeros(2, 3, 32))), ValueError, "timestep"),
    Case("DiT text batch", api(lambda i, o: tiny_dit()(torch.zeros(2, 16, 1, 4, 4), torch.zeros(2),
                                                       torch.zeros(1, 3, 32))), ValueError, "encoder_hidden_states"),
    Case("DiT channels", api(lambda i, o: tiny_dit()(torch.zeros(1, 12, 1, 4, 4), torch.zeros(1),
                                                     torch.zeros(1, 3, 32))), ValueError, "hidden_states"),
    Case("DiT heads unknowable (API)", api(lambda i, o: load_dit(i / "no_metadata_dit.safetensors")),
         RefAlignInputError, "head"),
    Case("index escapes its folder", api(lambda i, o: read_safetensors(i / "bad.index.json")), RefAlignInputError,
         "points outside"),
    Case("index not JSON", api(lambda i, o: read_safetensors(i / "notjson.index.json")), RefAlignInputError,
         "index"),
    Case("VAE class not allowed", api(lambda i, o: load_vae(i / "odd_vae.safetensors")), RefAlignInputError,
         "os.system"),
    Case("video fps nan", api(lambda i, o: write_video(torch.rand(3, 16, 16, 3), o / "v.mp4", fps=math.nan)),
         RefAlignInputError, "fps"),
    Case("video frames shape", api(lambda i, o: write_video(torch.rand(16, 16, 3), o / "v.mp4")),
         RefAlignInputError, "frames"),
    # identity check
    Case("identity names as text", api(lambda i, o: check_identity([torch.rand(32, 32, 3)] * 2,
                                                                   torch.rand(3, 32, 32, 3), None, names="ab")),
         RefAlignInputError, "names"),
    Case("identity names short", api(lambda i, o: check_identity([torch.rand(32, 32, 3)] * 2,
                                                                 torch.rand(3, 32, 32, 3), None, names=["a"])),
         RefAlignInputError, "names"),
    Case("identity masks short", api(lambda i, o: check_identity([torch.rand(32, 32, 3)] * 2,
                                                                 torch.rand(3, 32, 32, 3), None, masks=[None])),
         RefAlignInputError, "masks"),
    Case("identity NaN frames", api(lambda i, o: check_identity([torch.rand(32, 32, 3)],
                                                                torch.full((3, 32, 32, 3), math.nan), None)),
         RefAlignInputError, "NaN"),
    Case("identity one [H,W,3] reference", api(lambda i, o: check_identity(torch.rand(32, 32, 3),
                                                                           torch.rand(3, 32, 32, 3), None)),
         RefAlignInputError, "references"),
    # ComfyUI nodes (stand-ins for ComfyUI's runtime; the pack shares the core's RefAlignInputError)
    Case("node Loader unknown model", api(lambda i, o: node(o, "RefAlignLoader", "nope.safetensors",
                                                             "default")), RefAlignInputError, "unet_name: nope"),
    Case("node Loader weight dtype", api(lambda i, o: node(o, "RefAlignLoader", "nope.safetensors",
                                                            "fp4")), RefAlignInputError, "weight_dtype"),
    Case("node references NaN image", api(lambda i, o: node(o, "RefAlignMultiSubjectReference", 64, 64,
                                                            image_1=torch.full((1, 32, 32, 3), math.nan))),
         RefAlignInputError, "NaN"),
    Case("node references none", api(lambda i, o: node(o, "RefAlignMultiSubjectReference", 64, 64)),
         RefAlignInputError, "no references"),
    Case("node references size", api(lambda i, o: node(o, "RefAlignMultiSubjectReference", 65, 64,
                                                       image_1=torch.rand(1, 32, 32, 3))), RefAlignInputError,
         "multiples of 16"),
    Case("node references five", api(lambda i, o: node(o, "RefAlignMultiSubjectReference", 64, 64,
                                                       image_1=torch.rand(5, 32, 32, 3))), RefAlignInputError,
         "at most 4"),
    Case("node identity NaN frames", api(lambda i, o: node(o, "RefAlignIdentityCheck",
                                                           torch.full((3, 32, 32, 3), math.nan), False, 8,
                                                           reference_images=torch.rand(1, 32, 32, 3))),
         RefAlignInputError, "NaN"),
    Case("node identity without references", api(lambda i, o: node(o, "RefAlignIdentityCheck",
                                                                   torch.rand(3, 32, 32, 3), False, 8)),
         RefAlignInputError, "no references"),
    # evaluation
    *[Case(f"eval cases {name}", command("--cases", f"{{i}}/cases/{name}.json", "--videos", "{i}", "--out", "{o}/r",
                                         run=eval_cli), 2, needle)
      for name, needle in [("notjson", "not a readable JSON"), ("number", "list of cases"), ("escape", "id"),
                           ("twice", "used twice"), ("names_text", "names"), ("masks_short", "masks"),
                           ("five", "1–4"), ("ref_outside", "points outside")]],
    Case("eval videos missing", command("--cases", "{i}/cases/ok.json", "--videos", "{i}/none", "--out", "{o}/r",
                                        run=eval_cli), 2, "--videos"),
    Case("eval out under a file", command("--cases", "{i}/cases/ok.json", "--videos", "{i}", "--out",
                                          "{i}/a_file/r", run=eval_cli), 2, "a_file"),
    # training config and datasets (all checked before anything is built)
    *[Case(f"config {text}", api(lambda i, o, text=text: load_training_config(write(o.parent / "c.yaml", text))),
           RefAlignInputError, key)
      for key, text in [("train.lr", "train: {lr: 1e-4}"), ("train.lr", "train: {lr: -1.0}"),
                        ("train.lr", "train: {lr: .nan}"), ("train.checkpoint_every", "train: {checkpoint_every: 0}"),
                        ("train.grad_accum", "train: {grad_accum: 0}"), ("train.mode", "train: {mode: LoRA}"),
                        ("train.mode", "train: {mode: fulll}"), ("train.learning_rate", "train: {learning_rate: 1}"),
                        ("train.batch_size", "train: {batch_size: 2.5}"), ("data.fps", "data: {fps: 0}"),
                        ("train.ema_decay", "train: {ema_decay: 1.5}"), ("data", "data: 5"),
                        ("model.dit_config", "model: {dit: a.safetensors, dit_config: {num_layers: 2}}")]],
    *[Case(f"train without model.{key}", api(lambda i, o, key=key: train(load_training_config(None, [
        m for m in TOY_MODELS if not m.startswith(f"model.{key}=")]), o / "run")), RefAlignInputError, f"model.{key}")
      for key in ("dit", "vae", "text_encoder")],
    Case("train vae missing", api(lambda i, o: train(load_training_config(None, TOY_MODELS + [
        f"model.vae={i}/none.safetensors"]), o / "run")), RefAlignInputError, "model.vae"),
    Case("train dataset missing", api(lambda i, o: train(load_training_config(None, TOY_MODELS + [
        f'data.datasets=[{{path: "{i}/none.jsonl"}}]']), o / "run")), RefAlignInputError, "data.datasets[0].path"),
    Case("train output under a file", api(lambda i, o: train(load_training_config(None, TOY_MODELS),
                                                             i / "a_file" / "run")), RefAlignInputError, "a_file"),
    Case("train previews prompts missing", api(lambda i, o: train(load_training_config(None, TOY_MODELS + [
        f"previews.prompts={i}/none.txt"]), o / "run")), RefAlignInputError, "previews.prompts"),
    Case("config not YAML", api(lambda i, o: load_training_config(write(o.parent / "c.yaml", "a: [b"))),
         RefAlignInputError, "YAML"),
    Case("config missing", api(lambda i, o: load_training_config(i / "none.yaml")), RefAlignInputError, "none.yaml"),
    Case("dataset manifest missing", api(lambda i, o: read_jsonl(i / "none.jsonl", SkipCounter())),
         RefAlignInputError, "none.jsonl"),
    Case("dataset folder without references", api(lambda i, o: read_folder(i / "empty_dataset", SkipCounter())),
         RefAlignInputError, "references/"),
    Case("dataset OpenS2V JSON broken", api(lambda i, o: list(read_opens2v(i / "not.json", None, None,
                                                                           SkipCounter()))),
         RefAlignInputError, "not.json"),
    Case("sample prompts bad size", api(lambda i, o: read_sample_prompts(i / "prompts.txt", 5.0)),
         RefAlignInputError, "prompts.txt:1"),
]
TOY = Path(__file__).parents[1] / "refalign_core" / "toy" / "models" / "refalign_toy"
TOY_MODELS = [f"model.dit={TOY / 'dit.safetensors'}", f"model.vae={TOY / 'vae.safetensors'}",
              f"model.text_encoder={TOY / 'text_encoder'}"]


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


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return make_inputs(tmp_path_factory.mktemp("bad_inputs"))


def test_there_are_enough_cases():
    assert len(CASES) >= 80 and len({c.id for c in CASES}) == len(CASES)


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


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_clear_error_before_any_output(case, inputs, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    before = sorted(os.listdir(inputs))
    check_clear_error(case, inputs, out, capsys)
    assert list(out.iterdir()) == []  # nothing written, not even half
    assert sorted(os.listdir(inputs)) == before


def test_inputs_that_used_to_go_silently_wrong(inputs, tmp_path):
    # a 16-bit grayscale PNG is grey, not white
    ramp = Image.fromarray((np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16))
    ramp.save(tmp_path / "grey16.png")
    image, _ = to_chw(load_image(tmp_path / "grey16.png"))
    assert abs(image.mean().item() - 0.5) < 0.01 and image.min() == 0
    # a phone photo stored sideways with an EXIF orientation comes in upright
    photo = Image.new("RGB", (60, 30), "red")
    photo.paste((0, 0, 255), (0, 0, 30, 30))  # blue on the left of the sensor image
    exif = photo.getexif()
    exif[0x0112] = 6  # rotate 90° clockwise to view
    photo.save(tmp_path / "phone.jpg", exif=exif)
    upright = load_image(tmp_path / "phone.jpg")
    assert upright.size == (30, 60)
    top = np.asarray(upright)[:10].mean((0, 1))
    assert top[2] > 150 and top[0] < 100  # the blue half is on top once turned
    # a string of names is refused (above); a 1-reference list with one name works
    report = check_identity([torch.rand(32, 32, 3)], torch.rand(3, 32, 32, 3),
                            lambda x: torch.rand(x.shape[0], (x.shape[2] // 16) * (x.shape[3] // 16), 8),
                            names=["alice"])
    assert [s.name for s in report.subjects] == ["alice"]


def test_an_8000_pixel_reference_is_reduced_while_decoding(tmp_path):
    import subprocess
    import sys

    Image.new("RGB", (8000, 8000), (20, 200, 20)).save(tmp_path / "huge.jpg", quality=90)
    # VmHWM: this process's own peak (ru_maxrss can carry over the forking parent's peak)
    script = ("import re, sys, torch; from refalign_core.inference.references import prepare_references;"
              "from refalign_core.inference.video_io import load_image;"
              f"refs = prepare_references([load_image({str(tmp_path / 'huge.jpg')!r}, (64, 64))], 64, 64);"
              "peak = re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1);"
              "print(peak, float(refs[0, 1, 32, 32]))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    peak_kb, green = result.stdout.split()
    assert float(green) > 0.7
    assert int(peak_kb) < 1_000_000, f"peak {int(peak_kb) / 1e6:.2f} GB"  # was 11.2 GB (torch alone: ~0.47 GB)


def test_a_reference_above_the_pixel_limit_is_refused_before_decoding():
    huge = Image.new("1", (12_000, 12_000))
    with pytest.raises(RefAlignInputError, match="12000x12000"):
        fit_on_white(huge, 64, 64)
    with pytest.raises(RefAlignInputError, match="at most 4"):
        prepare_references([torch.rand(32, 32, 3)] * 5, 64, 64, max_references=4)
    assert prepare_references([Reference(torch.rand(32, 32, 3))], 64, 64).shape == (1, 3, 64, 64)
