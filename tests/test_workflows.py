import copy
import json
from pathlib import Path

import pytest

from pack import load_pack
from workflow_tools import CORE_NODES, pack_signatures, to_api_prompt, validate

WORKFLOWS = sorted((Path(__file__).parents[1] / "workflows").glob("*.json"))


@pytest.fixture(scope="module")
def signatures():
    return {**CORE_NODES, **pack_signatures(load_pack())}


def test_the_four_workflows_ship():
    names = {p.stem for p in WORKFLOWS}
    assert {"refalign_toy_demo", "refalign_1.3b_single_subject", "refalign_multi_subject",
            "refalign_ab_identity_comparison"} <= names


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_is_valid(path, signatures):
    workflow = json.loads(path.read_text())
    assert validate(workflow, signatures) == []
    types = {n["type"] for n in workflow["nodes"]}
    assert types <= set(signatures) | {"Note", "MarkdownNote"}  # core nodes and ours only
    for node in workflow["nodes"]:
        if node["type"].startswith("RefAlign"):
            assert node["properties"]["cnr_id"] == "refalign" and node["properties"]["Node name for S&R"] == node["type"]
    prompt = to_api_prompt(workflow, signatures)
    outputs = [n for n in prompt.values() if n["class_type"] in ("SaveVideo", "SaveAnimatedWEBP", "PreviewImage",
                                                                 "RefAlignIdentityCheck")]
    assert outputs, "a workflow needs an output node to run"
    sampler = next(n for n in prompt.values() if n["class_type"] == "RefAlignR2VSampler")
    assert isinstance(sampler["inputs"]["seed"], int) and sampler["inputs"]["sampler"] in ("euler", "unipc")
    assert sampler["inputs"]["model"][0] in prompt


def test_real_model_workflows_name_their_model_files(signatures):
    for path in WORKFLOWS:
        workflow = json.loads(path.read_text())
        if any(n["type"] == "CLIPLoader" for n in workflow["nodes"]):
            directories = {m["directory"] for m in workflow["models"]}
            assert {"refalign", "text_encoders", "vae"} <= directories
            assert all(m["url"].startswith("https://") for m in workflow["models"])
            assert any(n["type"] == "MarkdownNote" and "models/refalign" in n["widgets_values"][0]
                       for n in workflow["nodes"])


def test_validator_catches_broken_workflows(signatures):
    workflow = json.loads((Path(__file__).parents[1] / "workflows" / "refalign_toy_demo.json").read_text())
    sampler = next(n for n in workflow["nodes"] if n["type"] == "RefAlignR2VSampler")

    def broken(mutate):
        w = copy.deepcopy(workflow)
        mutate(w, next(n for n in w["nodes"] if n["id"] == sampler["id"]))
        return validate(w, signatures)

    assert any("widget values" in e for e in broken(lambda w, n: n["widgets_values"].remove("fixed")))
    assert any("width" in e for e in broken(lambda w, n: n["widgets_values"].__setitem__(2, 60)))
    assert any("sampler" in e for e in broken(lambda w, n: n["widgets_values"].__setitem__(11, "ddim")))
    assert any("unknown node type" in e for e in broken(lambda w, n: n.__setitem__("type", "RefAlignSamplerV2")))
    assert any("types or ends" in e for e in broken(lambda w, n: w["links"][2].__setitem__(5, "MODEL")))
    assert any("not connected" in e for e in broken(lambda w, n: n["inputs"][0].__setitem__("link", None)))
