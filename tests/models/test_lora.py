"""LoRA formats: each loads and changes the output exactly as the merged weights do."""

import json

import pytest
import torch
from safetensors.torch import save_file

from refalign_core.models.checkpoint import dit_from_state_dict, dit_state_dict_original
from refalign_core.errors import RefAlignInputError
from refalign_core.models.lora import LoraSpec, applied_loras, apply_loras, remove_loras
from tiny_models import tiny_dit
from refalign_core.training import LORA_TARGETS, lora_state_dict_for_comfyui

from helpers import video_inputs

RANK, ALPHA = 4, 8.0
HEADS = {"refalign.dit_config": json.dumps({"num_attention_heads": 2})}


def comfy_lora(seed=1) -> dict[str, torch.Tensor]:
    """A trained-looking LoRA over every Linear train.py targets, exported as train.py does (ComfyUI format)."""
    from peft import LoraConfig
    model = tiny_dit(0)
    model.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=LORA_TARGETS))
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.1
    return lora_state_dict_for_comfyui(model.state_dict(), alpha=ALPHA)


def merged_dit(lora: dict, strength: float, biases: dict | None = None):
    """The expected model: W + strength·(alpha/r)·B·A and bias + strength·diff_b, merged by hand."""
    weights = {k: v.clone() for k, v in dit_state_dict_original(tiny_dit(0)).items()}
    for key, down in lora.items():
        if key.endswith(".lora_down.weight"):
            module = key[len("diffusion_model."): -len(".lora_down.weight")]
            up = lora[key.replace("lora_down", "lora_up")]
            weights[module + ".weight"] += strength * ALPHA / RANK * up @ down
    for module, delta in (biases or {}).items():
        weights[module + ".bias"] += strength * delta
    return dit_from_state_dict(weights, HEADS)


def kohya(lora):
    return {"lora_unet_" + k[len("diffusion_model."):].split(".lora_")[0].rsplit(".alpha")[0].replace(".", "_")
            + k[len(k.split(".lora_")[0].rsplit(".alpha")[0]):]: v for k, v in lora.items()}


def diffusers_names(lora, prefix):
    """ComfyUI format -> diffusers/peft names with alpha folded into B (what diffusers / peft save)."""
    from refalign_core.models.checkpoint import convert_wan_transformer_to_diffusers
    out = {}
    for key, down in lora.items():
        if key.endswith(".lora_down.weight"):
            module = key[len("diffusion_model."): -len(".lora_down.weight")]
            name = next(iter(convert_wan_transformer_to_diffusers({module + ".weight": down})))[: -len(".weight")]
            out[f"{prefix}{name}.lora_A.weight"] = down
            out[f"{prefix}{name}.lora_B.weight"] = lora[key.replace("lora_down", "lora_up")] * (ALPHA / RANK)
    return out


def lightx2v(lora):
    """A step-distill-style LoRA: lora_A/lora_B names, alpha, bias deltas (`diff_b`) and zero norm diffs."""
    out = {k.replace("lora_down", "lora_A").replace("lora_up", "lora_B"): v for k, v in lora.items()}
    g = torch.Generator().manual_seed(7)
    biases = {f"blocks.{i}.self_attn.q": torch.randn(32, generator=g) * 0.1 for i in range(2)}
    biases["blocks.1.ffn.2"] = torch.randn(32, generator=g) * 0.1
    out.update({f"diffusion_model.{m}.diff_b": v for m, v in biases.items()})
    out["diffusion_model.blocks.0.norm3.diff"] = torch.zeros(32)
    out["diffusion_model.blocks.0.norm3.diff_b"] = torch.zeros(32)
    return out, biases


@torch.no_grad()
def output(model):
    x, t, text, refs = video_inputs()
    return model(x, t, text, reference_latents=refs).sample


FORMATS = {
    "comfyui (train.py export)": lambda lora: (lora, None),
    "original names, no prefix": lambda lora: ({k[len("diffusion_model."):]: v for k, v in lora.items()}, None),
    "kohya / musubi": lambda lora: (kohya(lora), None),
    "diffusers": lambda lora: (diffusers_names(lora, "transformer."), None),
    "peft": lambda lora: (diffusers_names(lora, "base_model.model."), None),
    "lightx2v step-distill": lightx2v,
}


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("fuse", [True, False])
def test_each_format_equals_the_merged_weights(tmp_path, fmt, fuse):
    lora = comfy_lora()
    converted, biases = FORMATS[fmt](lora)
    save_file(converted, tmp_path / "l.safetensors")
    dit = tiny_dit(0)
    base = output(dit)
    apply_loras(dit, [LoraSpec(str(tmp_path / "l.safetensors"), 0.8)], fuse=fuse)
    got = output(dit)
    expected = output(merged_dit(lora, 0.8, biases))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert (got - base).abs().max() > 1e-2
    remove_loras(dit)
    torch.testing.assert_close(output(dit), base, rtol=0, atol=1e-6)


def test_strength_zero_is_no_lora_and_two_loras_add(tmp_path):
    first, second = comfy_lora(1), comfy_lora(2)
    save_file(first, tmp_path / "a.safetensors")
    save_file(second, tmp_path / "b.safetensors")
    dit = tiny_dit(0)
    base = output(dit)
    apply_loras(dit, [LoraSpec(str(tmp_path / "a.safetensors"), 0.0)])
    assert torch.equal(output(dit), base)
    specs = [LoraSpec(str(tmp_path / "a.safetensors"), 0.5), LoraSpec(str(tmp_path / "b.safetensors"), 1.0)]
    apply_loras(dit, specs)
    assert applied_loras(dit) == specs
    both = {k: v.clone() for k, v in dit_state_dict_original(tiny_dit(0)).items()}
    for lora, s in ((first, 0.5), (second, 1.0)):
        for key, down in lora.items():
            if key.endswith(".lora_down.weight"):
                module = key[len("diffusion_model."): -len(".lora_down.weight")]
                both[module + ".weight"] += s * ALPHA / RANK * lora[key.replace("lora_down", "lora_up")] @ down
    torch.testing.assert_close(output(dit), output(dit_from_state_dict(both, HEADS)), rtol=0, atol=1e-5)
    apply_loras(dit, specs[1:])  # switching replaces: unfuse the old ones first
    torch.testing.assert_close(output(dit), output(merged_dit(second, 1.0)), rtol=0, atol=1e-5)


def test_wrong_base_model_and_no_matching_keys_are_refused_naming_the_file(tmp_path):
    wide = {k: torch.cat([v, v], dim=-1) if k.endswith("lora_down.weight") else v for k, v in comfy_lora().items()}
    save_file(wide, tmp_path / "wan14b.safetensors")
    save_file({"text_model.layer.weight": torch.zeros(2, 2)}, tmp_path / "sdxl.safetensors")
    save_file({"lora_unet_down_blocks_0_attn.lora_down.weight": torch.zeros(2, 2)}, tmp_path / "sd15.safetensors")
    dit = tiny_dit(0)
    for name in ("wan14b", "sdxl", "sd15"):
        with pytest.raises(RefAlignInputError, match=f"{name}.safetensors"):
            apply_loras(dit, [LoraSpec(str(tmp_path / f"{name}.safetensors"))])
    with pytest.raises(RefAlignInputError, match="strength"):
        LoraSpec("x.safetensors", float("nan"))


def test_cli_spec_parsing(tmp_path):
    assert LoraSpec.parse("a.safetensors:0.7") == LoraSpec("a.safetensors", 0.7)
    assert LoraSpec.parse("a.safetensors") == LoraSpec("a.safetensors", 1.0)
    odd = tmp_path / "odd:name.safetensors"
    odd.write_bytes(b"")
    assert LoraSpec.parse(str(odd)) == LoraSpec(str(odd), 1.0)
    with pytest.raises(RefAlignInputError, match="strength"):
        LoraSpec.parse("a.safetensors:strong")


@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float8_e4m3fn])
def test_low_precision_storage_takes_a_lora_within_its_rounding(tmp_path, storage):
    from refalign_core.models.checkpoint import load_dit, save_dit
    lora = comfy_lora()
    save_file(lora, tmp_path / "l.safetensors")
    save_dit(tiny_dit(0), tmp_path / "dit.safetensors")
    dit = load_dit(tmp_path / "dit.safetensors", weight_dtype=storage)
    rounding = (output(dit) - output(tiny_dit(0))).abs().max()
    base = output(dit)
    apply_loras(dit, [LoraSpec(str(tmp_path / "l.safetensors"), 0.8)])  # fp8: unfused, adapters in fp32
    error = (output(dit) - output(merged_dit(lora, 0.8))).abs().max()
    assert error < 1.5 * rounding + 1e-3 and (output(dit) - base).abs().max() > 0.1
