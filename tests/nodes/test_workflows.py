import copy
import json
import sys
from pathlib import Path

import pytest

from pack import load_pack, pack_nodes

ROOT = Path(__file__).parents[2]
sys.path.insert(0, str(ROOT / "tools"))
from workflow_tools import CORE_NODES, object_info_signatures, schema_signatures, to_api_prompt, validate  # noqa: E402

WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))


@pytest.fixture(scope="module")
def signatures():
    return {**CORE_NODES, **schema_signatures(pack_nodes(load_pack()))}


REAL = [p for p in WORKFLOWS if "1.3b" in p.stem or "multi_subject" in p.stem]


def test_the_workflows_ship():
    names = {p.stem for p in WORKFLOWS}
    assert names == {"refalign_toy_demo", "refalign_1.3b_single_subject", "refalign_multi_subject",
                     "refalign_ab_identity_comparison", "refalign_toy_three_segments"}
    ids = [json.loads(p.read_text())["id"] for p in WORKFLOWS]
    assert len(set(ids)) == len(ids)  # the frontend keys open tabs by id


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
    for node in prompt.values():
        for value in node["inputs"].values():
            if isinstance(value, list):
                assert value[0] in prompt, f"{node['class_type']} is fed by a node that is not sent"
    samplers = [n for n in prompt.values() if n["class_type"] in ("RefAlignR2VSampler", "SamplerCustomAdvanced")]
    assert samplers
    for sampler in samplers:
        if sampler["class_type"] == "RefAlignR2VSampler":
            assert isinstance(sampler["inputs"]["seed"], int) and sampler["inputs"]["sampler"] in ("euler", "unipc")


def _upstream(prompt, node_id, name):
    """Class types along the MODEL chain feeding input `name` of `node_id`."""
    chain = []
    while name in prompt[node_id]["inputs"]:
        node_id = prompt[node_id]["inputs"][name][0]
        chain.append(prompt[node_id]["class_type"])
        name = "model"
    return chain


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_every_sampler_gets_a_refalign_patched_comfyui_model(path, signatures):
    workflow = json.loads(path.read_text())
    prompt = to_api_prompt(workflow, signatures)
    for node_id, node in prompt.items():
        if node["class_type"] in ("RefAlignR2VSampler", "RefAlignGuider"):
            chain = _upstream(prompt, node_id, "model")
            assert chain[-1] == "RefAlignLoader" or "RefAlignModelPatch" in chain, chain
        if node["class_type"] == "RefAlignGuider":
            # RefAlign's three passes: prompt + refs, negative + refs, negative + zero refs, from one conditioning node
            conds = [node["inputs"][k] for k in ("positive", "negative_text", "negative_img_text")]
            assert {c[0] for c in conds} == {conds[0][0]} and [c[1] for c in conds] == [0, 1, 2]
            assert prompt[conds[0][0]]["class_type"] == "RefAlignSubjectConditioning"
            assert _upstream(prompt, node_id, "model")[0] == "ModelSamplingSD3"  # shift 5 for core schedulers
        if node["class_type"] == "RefAlignIdentityCheck":
            assert "references" in node["inputs"]


@pytest.mark.parametrize("path", REAL, ids=lambda p: p.stem)
def test_real_model_workflows_offer_a_bypassed_lora(path):
    lora = [n for n in json.loads(path.read_text())["nodes"] if n["type"] == "LoraLoaderModelOnly"]
    assert len(lora) == 1 and lora[0]["mode"] == 4  # offered, bypassed until the user picks a LoRA


def test_real_model_workflows_name_their_model_files(signatures):
    for path in REAL:
        workflow = json.loads(path.read_text())
        assert {m["directory"] for m in workflow["models"]} == {"diffusion_models", "text_encoders", "vae"}
        assert all(m["url"].startswith("https://") for m in workflow["models"])
        loaders = [n for n in workflow["nodes"] if n["type"] in ("RefAlignLoader", "CLIPLoader", "VAELoader")]
        assert len(loaders) == 3
        for node in loaders:  # the frontend offers the download of a missing file from the node's properties
            (model,) = node["properties"]["models"]
            assert model["name"] == node["widgets_values"][0] and model in workflow["models"]
        assert any(n["type"] == "MarkdownNote" and "models/diffusion_models" in n["widgets_values"][0]
                   for n in workflow["nodes"])


def test_validator_catches_broken_workflows(signatures):
    workflow = json.loads((Path(__file__).parents[2] / "workflows" / "refalign_toy_demo.json").read_text())
    sampler = next(n for n in workflow["nodes"] if n["type"] == "RefAlignR2VSampler")

    def broken(mutate):
        w = copy.deepcopy(workflow)
        mutate(w, next(n for n in w["nodes"] if n["id"] == sampler["id"]))
        return validate(w, signatures)

    assert any("widget values" in e for e in broken(lambda w, n: n["widgets_values"].remove("fixed")))
    assert any("width" in e for e in broken(lambda w, n: n["widgets_values"].__setitem__(0, 60)))
    assert any("sampler" in e for e in broken(lambda w, n: n["widgets_values"].__setitem__(9, "ddim")))
    assert any("unknown node type" in e for e in broken(lambda w, n: n.__setitem__("type", "RefAlignSamplerV2")))
    assert any("types or ends" in e for e in broken(lambda w, n: w["links"][2].__setitem__(5, "MODEL")))
    assert any("not connected" in e for e in broken(lambda w, n: n["inputs"][0].__setitem__("link", None)))
    # the frontend's zod rules
    assert any("id must be a UUID" in e for e in broken(lambda w, n: w.__setitem__("id", "refalign-toy-demo")))
    assert any("id must be a UUID" in e for e in broken(lambda w, n: w.__setitem__("id", None)))
    assert validate({**workflow, "id": "0f9a3c1e-8d7b-4b6a-9e2f-1c3d5e7f9a0b"}, signatures) == []
    assert any("cnr_id" in e for e in broken(lambda w, n: n["properties"].__setitem__("cnr_id", "-refalign")))
    assert any("bad 'pos'" in e for e in broken(lambda w, n: n.__setitem__("pos", [0, True])))
    assert any("groups may be left out" in e for e in broken(lambda w, n: w.__setitem__("groups", None)))
    assert any("absolute url" in e for e in broken(
        lambda w, n: w.__setitem__("models", [{"name": "a", "url": "huggingface.co/a", "directory": "vae"}])))
    # layout: a node too short for its widgets, nodes drawn over each other
    assert any("px tall" in e for e in broken(lambda w, n: n["size"].__setitem__(1, 120)))
    assert any("overlap" in e for e in broken(lambda w, n: n.__setitem__("pos", list(w["nodes"][1]["pos"]))))
    # a socket takes its own type only; '*' takes any
    assert any("types or ends" in e for e in broken(lambda w, n: w["links"][0].__setitem__(5, "LATENT")))


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_image_inputs_name_only_files_a_fresh_comfyui_has(path):
    """Nothing is installed into ComfyUI's input folder: Load Image starts on ComfyUI's own example.png, the toy
    subjects come from RefAlign Example Image (the pack's files, read in place)."""
    nodes = json.loads(path.read_text())["nodes"]
    assert all(n["widgets_values"][0] == "example.png" for n in nodes if n["type"] == "LoadImage")
    examples = (ROOT / "examples").glob("refalign_example_*.png")
    assert {n["widgets_values"][0] for n in nodes if n["type"] == "RefAlignExampleImage"} <= {p.name for p in examples}


def test_object_info_signatures_read_a_servers_node_list():
    """tools/comfyui_workflows.py checks the workflows against a running server's /object_info: V1 and V3 combos,
    the upload widget LoadImage adds, input order and optional inputs, and model-file combos taken as any file."""
    from workflow_tools import ANY
    info = {
        "LoadImage": {"input": {"required": {"image": [["example.png"], {"image_upload": True}]}},
                      "input_order": {"required": ["image"]}, "output": ["IMAGE", "MASK"]},
        "Sampler": {"input": {"required": {"steps": ["INT", {"default": 20, "min": 1}],
                                           "sampler": ["COMBO", {"options": ["euler", "unipc"]}],
                                           "unet_name": [["a.safetensors"], {}]},
                              "optional": {"previews": ["BOOLEAN", {"default": True}]}},
                    "input_order": {"required": ["unet_name", "steps", "sampler"], "optional": ["previews"]},
                    "output": ["LATENT"]},
    }
    signatures = object_info_signatures(info)
    assert signatures["LoadImage"] == ([("image", "COMBO", {"image_upload": True, "options": ["example.png"],
                                                            "optional": False}),
                                        ("upload", "IMAGEUPLOAD", {})], ["IMAGE", "MASK"])
    inputs, outputs = signatures["Sampler"]
    assert [(name, kind) for name, kind, _ in inputs] == [("unet_name", "COMBO"), ("steps", "INT"),
                                                         ("sampler", "COMBO"), ("previews", "BOOLEAN")]
    assert inputs[0][2]["options"] is ANY and inputs[2][2]["options"] == ["euler", "unipc"]
    assert inputs[1][2] == {"default": 20, "min": 1, "optional": False} and inputs[3][2]["optional"] is True
    assert outputs == ["LATENT"]
