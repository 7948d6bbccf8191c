"""tools/comfyui_parity.py runs inside a real ComfyUI (CI has none); what of it needs no ComfyUI runs here, so the
tool cannot rot unseen: it imports with the pack's base dependencies, finds the embedded toy bundle, and its
peft-free LoRA goes through the trainer's exporter into ComfyUI's LoraLoader keys and merges into our DiT."""

import sys
from pathlib import Path

import torch

from refalign_core.inference.bundles import BUNDLE_FILE
from refalign_core.models.checkpoint import dit_state_dict_original
from refalign_core.models.lora import merge_lora
from tiny_models import tiny_dit
from scripts import load_script

TOOL = Path(__file__).parents[2] / "tools" / "comfyui_parity.py"


def load_tool():
    return load_script(TOOL, "comfyui_parity")


def test_the_parity_tool_imports_without_comfyui_or_the_train_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # not installed in ComfyUI's environment
    tool = load_tool()
    name, folder = tool.toy_bundle()
    assert name and (folder / BUNDLE_FILE).is_file()
    assert "comfy" not in sys.modules  # ComfyUI is opened by main(), not at import


def test_its_lora_exports_to_comfyui_keys_and_changes_every_target():
    tool = load_tool()
    dit = tool.randomised(tiny_dit(0, **tool.TOY_SHAPED))
    lora = tool.lora_state_dict_for_comfyui(tool.random_lora(dit), alpha=8)
    modules = {k[:-len(".lora_down.weight")] for k in lora if k.endswith(".lora_down.weight")}
    per_block = {"self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
                 "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2"}  # what peft's suffix match on LORA_TARGETS takes
    assert modules == {f"diffusion_model.blocks.{i}.{m}" for i in range(tool.TOY_SHAPED["num_layers"])
                       for m in per_block}
    assert all(k.startswith("diffusion_model.blocks.") for k in lora)
    base = dit_state_dict_original(dit)
    merged = merge_lora(base, lora, 0.8)
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert {f"{m[len('diffusion_model.'):]}.weight" for m in modules} == changed
