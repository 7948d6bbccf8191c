import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from refalign_core.__main__ import main
from refalign_core.toy.demo import DEMO_SETTINGS
from tiny_models import build_random_bundle
from refalign_core.inference.bundles import BUNDLE_FILE
from refalign_core.inference.pipeline import RefAlignPipeline
from refalign_core.inference.video_io import read_video_frames

ROOT = Path(__file__).parents[2]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return build_random_bundle(tmp_path_factory.mktemp("bundle"))


@pytest.fixture
def ref_images(tmp_path):
    paths = []
    for i, color in enumerate([(200, 30, 30), (30, 30, 200)]):
        path = tmp_path / f"ref{i}.png"
        Image.new("RGB", (40 + 20 * i, 30), color).save(path)
        paths.append(str(path))
    return paths


def test_bundle_loads_and_generates_frames(bundle):
    pipe = RefAlignPipeline.from_bundle(bundle)
    manifest = json.loads((bundle / BUNDLE_FILE).read_text())
    assert manifest["dit"] == "dit.safetensors" and pipe.vae is not None and pipe.text_encoder is not None
    result = pipe("a red ball", [torch.rand(20, 30, 3)], num_frames=5, steps=2)
    d = pipe.settings
    assert result.frames.shape == (5, d.height, d.width, 3)
    assert result.references.shape == (1, 3, d.height, d.width)
    assert 0 <= result.frames.min() and result.frames.max() <= 1


def test_vae_tiling_option_decodes_in_tiles(bundle):
    tiled = RefAlignPipeline.from_bundle(bundle, vae_tiling=True)
    assert tiled.vae.use_tiling and not RefAlignPipeline.from_bundle(bundle).vae.use_tiling
    tiled.vae.tile_sample_min_height = tiled.vae.tile_sample_min_width = 32
    tiled.vae.tile_sample_stride_height = tiled.vae.tile_sample_stride_width = 16
    calls = []
    original = tiled.vae.tiled_decode
    tiled.vae.tiled_decode = lambda *a, **k: calls.append(1) or original(*a, **k)
    frames = tiled("x", [torch.rand(16, 16, 3)], num_frames=5, steps=1, width=64, height=64).frames
    assert calls and frames.shape == (5, 64, 64, 3)


def test_cli_generate_writes_a_playable_video(bundle, ref_images, tmp_path):
    out = tmp_path / "video.mp4"
    args = ["generate", "--dit", str(bundle / "dit.safetensors"), "--vae", str(bundle / "vae.safetensors"),
            "--text-encoder", str(bundle / "text_encoder"), "--ref", ref_images[0], "--ref", ref_images[1],
            "--prompt", "a red ball and a blue box", "--width", "48", "--height", "32", "--num-frames", "9",
            "--steps", "2", "--out", str(out), "--save-latents", str(tmp_path / "lat.safetensors")]
    assert main(args) == 0
    frames = read_video_frames(out)
    assert frames.shape == (9, 32, 48, 3)
    assert (tmp_path / "lat.safetensors").is_file()


def test_cli_generate_from_precomputed_embeddings_matches_direct_run(bundle, ref_images, tmp_path):
    common = ["--width", "48", "--height", "32", "--num-frames", "5", "--steps", "2", "--seed", "5"]
    assert main(["encode-prompt", "--text-encoder", str(bundle / "text_encoder"), "--prompt", "a red ball",
                 "--out", str(tmp_path / "p.safetensors")]) == 0
    assert main(["encode-references", "--vae", str(bundle / "vae.safetensors"), "--ref", ref_images[0],
                 "--width", "48", "--height", "32", "--out", str(tmp_path / "r.safetensors")]) == 0
    assert main(["generate", "--dit", str(bundle / "dit.safetensors"), "--prompt-embeds", str(tmp_path / "p.safetensors"),
                 "--reference-latents", str(tmp_path / "r.safetensors"), *common,
                 "--save-latents", str(tmp_path / "a.safetensors")]) == 0
    assert main(["generate", "--bundle", str(bundle), "--prompt", "a red ball", "--ref", ref_images[0], *common,
                 "--save-latents", str(tmp_path / "b.safetensors")]) == 0
    from safetensors.torch import load_file
    a, b = load_file(tmp_path / "a.safetensors")["latents"], load_file(tmp_path / "b.safetensors")["latents"]
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_encode_references_writes_the_checked_format_and_generate_gives_the_same_video_bit_for_bit(
        bundle, ref_images, tmp_path, caplog):
    """The file encode-references writes carries its size, names and VAE probe; generate checks them against its
    VAE and size and samples exactly what it samples from the images. A file without metadata (as encode-references
    wrote before) gives the same latents, with a warning that it cannot be checked."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    common = ["--width", "48", "--height", "32", "--num-frames", "5", "--steps", "2", "--seed", "5"]
    assert main(["encode-references", "--vae", str(bundle / "vae.safetensors"), "--ref", ref_images[0], "--ref",
                 ref_images[1], "--width", "48", "--height", "32", "--out", str(tmp_path / "r.safetensors")]) == 0
    with safe_open(str(tmp_path / "r.safetensors"), "pt") as f:
        metadata = f.metadata()
    assert (metadata["width"], metadata["height"], json.loads(metadata["names"])) == ("48", "32",
                                                                                       ["ref0.png", "ref1.png"])
    generate = ["generate", "--bundle", str(bundle), "--prompt", "a red ball", *common]
    assert main(generate + ["--ref", ref_images[0], "--ref", ref_images[1],
                            "--save-latents", str(tmp_path / "images.safetensors")]) == 0
    assert main(generate + ["--reference-latents", str(tmp_path / "r.safetensors"),
                            "--save-latents", str(tmp_path / "file.safetensors")]) == 0
    save_file(load_file(tmp_path / "r.safetensors"), tmp_path / "old.safetensors")  # the same tensor, no metadata
    assert "no RefAlign metadata" not in caplog.text
    assert main(generate + ["--reference-latents", str(tmp_path / "old.safetensors"),
                            "--save-latents", str(tmp_path / "old_file.safetensors")]) == 0
    assert "--reference-latents" in caplog.text and "no RefAlign metadata" in caplog.text
    latents = {name: load_file(tmp_path / f"{name}.safetensors")["latents"] for name in ("images", "file", "old_file")}
    assert torch.equal(latents["file"], latents["images"]) and torch.equal(latents["old_file"], latents["images"])


def test_cli_reports_bad_input_as_one_clear_error(bundle, ref_images, tmp_path, capsys):
    code = main(["generate", "--bundle", str(bundle), "--prompt", "x", "--ref", ref_images[0], "--num-frames", "8",
                 "--out", str(tmp_path / "v.mp4")])
    assert code == 2
    assert "4n+1" in capsys.readouterr().err
    assert not (tmp_path / "v.mp4").exists()
    assert main(["generate", "--dit", str(tmp_path / "none.safetensors"), "--prompt", "x", "--ref", ref_images[0]]) == 2


def test_demo_command_writes_its_outputs(tmp_path, bundle, capsys):
    assert main(["demo", "--out", str(tmp_path), "--bundle", str(bundle)]) == 0
    printed = capsys.readouterr().out
    for name in ("demo.mp4", "demo.webp", "contact_sheet.png", "frames.png", "identity.json", "identity.txt"):
        assert (tmp_path / name).stat().st_size > 0 and name in printed
    assert read_video_frames(tmp_path / "demo.mp4").shape[0] == DEMO_SETTINGS.num_frames


def test_core_imports_nothing_from_comfyui():
    banned = {"comfy", "folder_paths", "nodes", "server", "comfy_api", "comfy_extras"}
    for path in (ROOT / "refalign_core").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
            assert not any(n.split(".")[0] in banned for n in names), (path, names)


def test_pack_entry_point_and_registry_metadata():
    """ComfyUI finds `comfy_entrypoint` (V3); loading the pack imports nothing of ComfyUI or of its nodes. Without
    `refalign_core` installed, the entry point makes the pack's own core the one `import refalign_core` finds (one
    copy, no `refalign_pack.refalign_core`)."""
    import tomllib
    code = ("import importlib.util, inspect, sys\n"
            f"spec = importlib.util.spec_from_file_location('refalign_pack', {str(ROOT / '__init__.py')!r}, "
            f"submodule_search_locations=[{str(ROOT)!r}])\n"
            "module = importlib.util.module_from_spec(spec)\n"
            "sys.modules[spec.name] = module\n"
            "spec.loader.exec_module(module)\n"
            "print(inspect.iscoroutinefunction(module.comfy_entrypoint), hasattr(module, 'NODE_CLASS_MAPPINGS'),\n"
            "      sorted(m for m in sys.modules if m.startswith(('comfy', 'refalign_pack.nodes', 'torch'))))\n"
            "class NotInstalled:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'refalign_core':\n"
            "            raise ModuleNotFoundError(name)\n"
            "sys.meta_path.insert(0, NotInstalled())\n"
            f"sys.path.insert(0, {str(ROOT / 'tests')!r})\n"
            "import asyncio, comfy_api_stub\n"
            "comfy_api_stub.install()\n"
            "nodes = asyncio.run(asyncio.run(module.comfy_entrypoint()).get_node_list())\n"
            "import refalign_core\n"
            "print(len(nodes), refalign_core.__file__, sorted(m for m in sys.modules if '.refalign_core' in m))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    listed = next(node.value for node in ast.parse((ROOT / "nodes" / "__init__.py").read_text()).body
                  if isinstance(node, ast.Assign) and node.targets[0].id == "NODES")  # every node of `NODES`
    assert result.stdout.split() == ["True", "False", "[]", str(len(listed.elts)),
                                     str(ROOT / "refalign_core" / "__init__.py"), "[]"], result.stdout + result.stderr
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "comfyui" not in project["project"]["name"].lower()
    comfy = project["tool"]["comfy"]
    assert comfy["PublisherId"] and comfy["requires-comfyui"].startswith(">=") and comfy.get("Icon", "x")
    assert "Apache License" in (ROOT / project["project"]["license"]["file"]).read_text()
    requirements = (ROOT / "requirements.txt").read_text().split()
    assert requirements == project["project"]["dependencies"]
    assert not any(r.startswith("torch") for r in requirements)
