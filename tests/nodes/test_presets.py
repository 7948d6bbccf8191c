"""The turbo preset in the R2V Sampler and the RefAlign Guider: the core's preset values replace the widgets'."""

import comfy_stubs
import pytest

from pack import load_pack, pack_nodes
from refalign_core.inference.sampler import PRESETS


@pytest.fixture
def pack(tmp_path):
    comfy_stubs.install(tmp_path)
    pack = load_pack()
    pack_nodes(pack)  # imports the nodes
    yield pack
    comfy_stubs.uninstall()


@pytest.mark.parametrize("preset", ["custom", "turbo"])
def test_the_r2v_sampler_applies_the_preset(pack, monkeypatch, preset):
    seen = {}
    module = pack.nodes.sampler
    monkeypatch.setattr(module, "sample_video", lambda *args: seen.setdefault("settings", args[5]) and (None, None))
    pack_nodes(pack)["RefAlignR2VSampler"].execute(None, None, None, None, None, 64, 64, 5, 30, 5.0, 5.0, 7.5, 0,
                                                   "unipc", "zeros_per_reference", -1, True, preset=preset)
    settings = seen["settings"]
    expected = PRESETS["turbo"] if preset == "turbo" else {"steps": 30, "guidance_steps": None, "sampler": "unipc"}
    assert {key: getattr(settings, key) for key in expected} == expected
    assert settings.shift == 5.0  # a preset keeps the model's shift


def test_the_guider_takes_the_presets_guidance(pack, monkeypatch):
    seen = {}
    module = pack.nodes.guider
    monkeypatch.setattr(module, "refalign_guider", lambda *args: seen.setdefault("settings", args[4]))
    pack_nodes(pack)["RefAlignGuider"].execute(None, None, None, None, 5.0, 7.5, -1, preset="turbo")
    assert seen["settings"].guidance_steps == PRESETS["turbo"]["guidance_steps"]
