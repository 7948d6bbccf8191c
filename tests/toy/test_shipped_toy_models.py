"""The committed toy bundles (`refalign_core/toy/models/`) are the ones `train/make_toy_bundle.py` describes, load
through the core loader and the ComfyUI Loader node, and drive the README's demo command."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

import comfy_stubs
from pack import load_pack, pack_nodes, run_node
from refalign_core.models.checkpoint import load_dit
from refalign_core.toy.demo import SHIPPED_BASELINE, SHIPPED_BUNDLE, SHIPPED_TURBO, demo_references, embedded_bundle
from refalign_core.training import load_training_config
from refalign_core.training.config import parse_config
from refalign_core.inference.pipeline import RefAlignPipeline
from refalign_core.toy.vae import ToyVideoVAE
from refalign_core.toy import EMBEDDED, MODELS_FOLDER as EMBEDDED_FOLDER
from scripts import load_script

EMBEDDED_MODEL, EMBEDDED_BASELINE = list(EMBEDDED)

ROOT = Path(__file__).parents[2]
RECORD = json.loads((SHIPPED_BUNDLE / "recipe.json").read_text())


def test_recorded_recipe_is_the_scripts_recipe():
    script = load_script(ROOT / "train" / "make_toy_bundle.py", "make_toy_bundle_script")
    assert RECORD["recipe"] == json.loads(json.dumps(script.RECIPE))
    assert RECORD["command"] == "python train/make_toy_bundle.py"


@pytest.mark.parametrize("name", sorted(RECORD["sha256"]))
def test_committed_files_match_the_recorded_hashes(name):
    assert hashlib.sha256((EMBEDDED_FOLDER / name).read_bytes()).hexdigest() == RECORD["sha256"][name]


def test_shipped_bundles_are_small_complete_and_load():
    bundles = (SHIPPED_BUNDLE, SHIPPED_BASELINE)
    files = [p for p in EMBEDDED_FOLDER.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 40 * 2**20
    turbo = {f"refalign_toy_turbo/{name}" for name in ("lora.safetensors", "recipe.json")}  # its own recipe
    assert {str(p.relative_to(EMBEDDED_FOLDER)) for p in files} - {"refalign_toy/recipe.json"} - turbo == \
        set(RECORD["sha256"])
    assert embedded_bundle() == SHIPPED_BUNDLE
    pipes = [RefAlignPipeline.from_bundle(folder) for folder in bundles]
    assert all(isinstance(p.vae, ToyVideoVAE) and p.text_encoder is not None for p in pipes)
    dits = [load_dit(folder / "dit.safetensors").state_dict() for folder in bundles]
    assert all(d.keys() == dits[0].keys() for d in dits)
    assert not all(torch.equal(dits[0][k], dits[1][k]) for k in dits[0])
    assert all(p.text_encoder.length == RECORD["recipe"]["text_length"] for p in pipes)
    for folder in bundles:  # each bundle is whole on its own: its JSON names no file outside it
        manifest = json.loads((folder / "refalign_bundle.json").read_text())
        assert all(".." not in str(manifest.get(k)) for k in ("dit", "vae", "text_encoder"))


def test_workflow_example_images_are_the_demo_references():
    for image, name in zip(demo_references(), ("red_disc", "striped_square")):
        shipped = np.array(Image.open(ROOT / "examples" / f"refalign_example_{name}.png").convert("RGB"))
        assert np.array_equal(shipped, np.array(image)), name


@pytest.fixture
def pack(tmp_path):
    comfy_stubs.install(tmp_path)
    pack = load_pack()
    pack_nodes(pack)
    yield pack
    comfy_stubs.uninstall()


def test_loader_node_offers_both_embedded_models_and_loads_each_ones_own_dit(pack, monkeypatch):
    loader = pack_nodes(pack)["RefAlignLoader"]
    choices = loader.GET_SCHEMA().inputs[0].options
    names = (EMBEDDED_MODEL, EMBEDDED_BASELINE)
    assert choices[:2] == list(names)
    paths = []  # ComfyUI's own loading of the DiT is checked in a real ComfyUI by tools/comfyui_parity.py
    monkeypatch.setattr(pack.nodes.loader, "load_native_dit", lambda path, options: paths.append(path) or "MODEL")
    for name in names:
        model, clip, vae = run_node(loader, unet_name=name, weight_dtype="default")
        assert model == "MODEL" and clip is not None and vae is not None  # a bundle brings its text encoder and VAE
    dits = [load_dit(path) for path in paths]
    assert not torch.equal(dits[0].blocks[0].attn1.to_q.weight, dits[1].blocks[0].attn1.to_q.weight)


@pytest.mark.slow
def test_readme_demo_command_runs_on_the_shipped_model(tmp_path):
    result = subprocess.run([sys.executable, "-m", "refalign_core", "demo", "--out", str(tmp_path)],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    for name in ("demo.mp4", "demo.webp", "contact_sheet.png", "frames.png", "identity.json", "identity.txt"):
        assert (tmp_path / name).stat().st_size > 0 and str(tmp_path / name) in result.stdout
    report = json.loads((tmp_path / "identity.json").read_text())
    assert len(report["subjects"]) == 2 and set(report["ceiling"]) == {s["name"] for s in report["subjects"]}
    assert set(report["judge_accuracy"]) == set(report["ceiling"])
    assert all(0 <= v <= 1 for v in report["judge_accuracy"].values())
    assert "ceiling (the same check on the toy world's own clip" in (tmp_path / "identity.txt").read_text()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".demo-")]  # its staging folder is gone


@pytest.mark.parametrize("name", ["refalign_toy_demo", "refalign_ab_identity_comparison"])
def test_toy_workflows_sample_with_the_shipped_defaults(name):
    defaults = json.loads((SHIPPED_BUNDLE / "refalign_bundle.json").read_text())["defaults"]
    workflow = json.loads((ROOT / "workflows" / f"{name}.json").read_text())
    samplers = [n["widgets_values"] for n in workflow["nodes"] if n["type"] == "RefAlignR2VSampler"]
    assert samplers
    for widgets in samplers:  # width, height, length, steps, shift, image / text guidance, sampler
        assert widgets[0:7] + [widgets[9]] == [defaults[k] for k in ("width", "height", "num_frames", "steps", "shift",
                                                                        "image_scale", "text_scale", "sampler")]


TURBO_RECORD = SHIPPED_TURBO.parent / "recipe.json"


def test_the_turbo_student_is_small_made_by_its_recipe_and_says_how_to_sample_it():
    record = json.loads(TURBO_RECORD.read_text())
    assert record["command"] == "python train/make_toy_turbo.py"
    # the recorded config read by today's schema (a field added since takes its default, which keeps what a run
    # did) is today's toy_turbo.yaml
    assert parse_config(record["config"]).to_dict() == \
        load_training_config(ROOT / "train" / "configs" / "toy_turbo.yaml").to_dict()
    assert hashlib.sha256(SHIPPED_TURBO.read_bytes()).hexdigest() == record["sha256"]["lora.safetensors"]
    assert SHIPPED_TURBO.stat().st_size <= 5 * 2**20
    with safe_open(SHIPPED_TURBO, "pt") as f:
        assert f.metadata()["refalign.preset"] == "turbo"


@pytest.mark.slow
def test_the_demo_runs_the_turbo_student(tmp_path):
    result = subprocess.run([sys.executable, "-m", "refalign_core", "demo", "--preset", "turbo", "--out",
                             str(tmp_path)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "identity.json").read_text())
    assert len(report["subjects"]) == 2 and all(0 <= v <= 1 for v in report["judge_accuracy"].values())
    assert "4/4" in result.stderr  # four sampling steps
