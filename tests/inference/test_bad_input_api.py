"""Bad input to the Python API: the pipeline, references, the DiT, weight files, video writing; plus the inputs that
used to give a silent wrong result, and memory on an 8000×8000 reference: one clear error each, before any output
(`bad_input.py`)."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from refalign_core.errors import RefAlignInputError
from refalign_core.inference.pipeline import VAECodec
from refalign_core.inference.reference_files import load_reference_latents, save_reference_latents
from refalign_core.inference.references import Reference, fit_on_white, prepare_references, to_chw
from refalign_core.inference.video_io import load_image, write_video
from refalign_core.metrics.identity import check_identity
from refalign_core.models.checkpoint import load_dit
from refalign_core.models.safetensors_io import read_safetensors
from refalign_core.models.vae import load_vae

from bad_input import Case, api, table_test, toy_pipe
from tiny_models import tiny_dit, tiny_vae

CASES = [
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
    Case("reference file NaN latents", api(lambda i, o: save_reference_latents(
        o / "r.safetensors", torch.full((1, 16, 1, 4, 4), math.nan), width=32, height=32,
        vae_probe=torch.zeros(1, 16, 1, 4, 4))), RefAlignInputError, "NaN"),
    Case("reference file latents of another size", api(lambda i, o: save_reference_latents(
        o / "r.safetensors", torch.zeros(1, 16, 1, 4, 4), width=64, height=32, vae_probe=torch.zeros(1, 16, 1, 4, 4))),
         RefAlignInputError, "but this run is 64x32"),
    Case("reference file of a later version", api(lambda i, o: load_reference_latents(i / "future_refs.safetensors")),
         RefAlignInputError, "version 9"),
    Case("reference file from another VAE", api(lambda i, o: load_reference_latents(
        i / "other_vae_refs.safetensors", vae_probe=VAECodec(tiny_vae(seed=0)))), RefAlignInputError,
         "encoded with another VAE"),
    Case("video fps nan", api(lambda i, o: write_video(torch.rand(3, 16, 16, 3), o / "v.mp4", fps=math.nan)),
         RefAlignInputError, "fps"),
    Case("video frames shape", api(lambda i, o: write_video(torch.rand(16, 16, 3), o / "v.mp4")),
         RefAlignInputError, "frames"),
]


test_bad_input_is_one_clear_error_before_any_output = table_test(CASES, 18)


def test_inputs_that_used_to_go_silently_wrong(bad_inputs, tmp_path):
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
