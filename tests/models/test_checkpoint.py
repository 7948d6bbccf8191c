import json
from pathlib import Path

import pytest
import torch
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
from safetensors.torch import save_file

from refalign_core.models.checkpoint import (dit_state_dict_original, expected_original_shapes, infer_dit_config,
                                             load_dit, save_dit)
from refalign_core.errors import RefAlignInputError

from helpers import video_inputs

CONFIGS = Path(__file__).parents[2] / "refalign_core" / "models" / "configs"


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k].float(), sb[k].float()) for k in sa)


def test_save_load_save_is_exact(dit, tmp_path):
    save_dit(dit, tmp_path / "a.safetensors")
    loaded = load_dit(tmp_path / "a.safetensors")
    assert same_weights(dit, loaded)
    save_dit(loaded, tmp_path / "b.safetensors")
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    x, t, text, refs = video_inputs()
    with torch.no_grad():
        assert torch.equal(dit(x, t, text, reference_latents=refs).sample,
                           loaded(x, t, text, reference_latents=refs).sample)


def test_saved_keys_are_the_original_wan_names(dit, tmp_path):
    keys = set(dit_state_dict_original(dit))
    assert {"patch_embedding.weight", "head.modulation", "head.head.weight", "text_embedding.0.weight",
            "time_projection.1.weight", "blocks.0.modulation", "blocks.0.norm3.weight",
            "blocks.0.self_attn.norm_q.weight", "blocks.0.cross_attn.o.bias", "blocks.0.ffn.2.weight"} <= keys
    assert not any("attn1" in k or "scale_shift_table" in k or "condition_embedder" in k for k in keys)


def test_our_inverse_naming_agrees_with_diffusers_converter(dit):
    original = dit_state_dict_original(dit)
    converted = convert_wan_transformer_to_diffusers(dict(original))
    reference = dit.state_dict()
    assert converted.keys() == reference.keys()
    assert all(torch.equal(converted[k], reference[k]) for k in reference)


@pytest.mark.parametrize("naming", ["comfy_prefix", "diffusers"])
def test_other_namings_load_to_the_same_model(dit, tmp_path, naming):
    if naming == "comfy_prefix":
        tensors = {f"model.diffusion_model.{k}": v for k, v in dit_state_dict_original(dit).items()}
    else:
        tensors = {k: v.contiguous() for k, v in dit.state_dict().items()}
    save_file(tensors, tmp_path / "m.safetensors", metadata={"refalign.dit_config": json.dumps({"num_attention_heads": 2})})
    assert same_weights(dit, load_dit(tmp_path / "m.safetensors"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn])
def test_weights_in_any_storage_dtype_load(dit, tmp_path, dtype):
    save_dit(dit, tmp_path / "m.safetensors", dtype=dtype)
    loaded = load_dit(tmp_path / "m.safetensors")
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    for (name, a), b in zip(dit.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a.to(dtype).float(), b), name
    x, t, text, refs = video_inputs()
    with torch.no_grad():
        err = (loaded(x, t, text, reference_latents=refs).sample - dit(x, t, text, reference_latents=refs).sample)
    tol = {torch.float32: 0, torch.float16: 5e-3, torch.bfloat16: 3e-2, torch.float8_e4m3fn: 0.3}[dtype]
    assert err.abs().max() <= tol


@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.float8_e4m3fn])
def test_low_precision_storage_with_fp32_compute(dit, tmp_path, weight_dtype):
    save_dit(dit, tmp_path / "m.safetensors")
    loaded = load_dit(tmp_path / "m.safetensors", weight_dtype=weight_dtype)
    assert loaded.blocks[0].attn1.to_q.weight.dtype == weight_dtype
    # diffusers' _keep_in_fp32_modules stay fp32 under low-precision storage
    assert loaded.condition_embedder.time_embedder.linear_1.weight.dtype == torch.float32
    assert loaded.blocks[0].scale_shift_table.dtype == torch.float32
    assert loaded.blocks[0].norm2.weight.dtype == torch.float32
    assert loaded.patch_embedding.weight.dtype == torch.float32
    x, t, text, refs = video_inputs()
    with torch.no_grad():
        out = loaded(x, t, text, reference_latents=refs).sample
        ref = dit(x, t, text, reference_latents=refs).sample
    assert out.dtype == torch.float32
    assert (out - ref).abs().max() < (0.05 if weight_dtype == torch.bfloat16 else 0.5)
    assert (out - ref).abs().max() > 0


def test_comfy_scaled_fp8_is_dequantised(dit, tmp_path):
    tensors = {}
    for k, v in dit_state_dict_original(dit).items():
        if k.startswith("blocks.0.self_attn.q.weight"):
            scale = v.abs().max() / 200
            tensors[k] = (v / scale).to(torch.float8_e4m3fn)
            tensors[k.replace(".weight", ".scale_weight")] = scale.reshape(1)
        else:
            tensors[k] = v
    tensors["scaled_fp8"] = torch.zeros(0, dtype=torch.float8_e4m3fn)
    save_file(tensors, tmp_path / "m.safetensors", metadata={"refalign.dit_config": json.dumps({"num_attention_heads": 2})})
    loaded = load_dit(tmp_path / "m.safetensors")
    torch.testing.assert_close(loaded.blocks[0].attn1.to_q.weight, dit.blocks[0].attn1.to_q.weight, rtol=0.07, atol=1e-3)


@pytest.mark.parametrize("name,count", [("wan2.1_t2v_1.3b.json", 825), ("wan2.1_t2v_14b.json", 1095)])
def test_real_release_shapes_are_detected(name, count):
    config = json.loads((CONFIGS / name).read_text())
    shapes = expected_original_shapes(config)  # built on the meta device: no memory
    assert len(shapes) == count
    prefixed = {f"model.diffusion_model.{k}": torch.empty(s, device="meta") for k, s in shapes.items()}
    from refalign_core.models.checkpoint import to_original_naming
    inferred = infer_dit_config(to_original_naming(prefixed))
    assert {k: (list(v) if isinstance(v, tuple) else v) for k, v in inferred.items()} == config


def write(tmp_path, tensors, name="m.safetensors", **meta):
    save_file(tensors, tmp_path / name, metadata={k: json.dumps(v) for k, v in meta.items()} or None)
    return tmp_path / name


def refused(path, *needles):
    with pytest.raises(RefAlignInputError) as info:
        load_dit(path)
    for needle in needles:
        assert needle in str(info.value), str(info.value)
    return str(info.value)


def test_refuses_i2v_vace_and_non_wan(dit, tmp_path):
    base = dit_state_dict_original(dit)
    i2v = dict(base, **{"img_emb.proj.0.weight": torch.zeros(4), "blocks.0.cross_attn.k_img.weight": torch.zeros(4, 4)})
    refused(write(tmp_path, i2v, "i2v.safetensors"), "I2V")
    vace = dict(base, **{"vace_patch_embedding.weight": torch.zeros(4)})
    refused(write(tmp_path, vace, "vace.safetensors"), "VACE")
    in36 = dict(base, **{"patch_embedding.weight": torch.zeros(32, 36, 1, 2, 2)})
    refused(write(tmp_path, in36, "in36.safetensors"), "I2V", "36")
    refused(write(tmp_path, {"conv_in.weight": torch.zeros(3), "down.0.weight": torch.zeros(2)}, "sd.safetensors"),
            "not a Wan2.1 DiT", "conv_in.weight")


def test_refuses_missing_and_unexpected_keys_by_name(dit, tmp_path):
    base = dit_state_dict_original(dit)
    missing = {k: v for k, v in base.items() if k != "blocks.1.cross_attn.q.bias"}
    refused(write(tmp_path, missing, "missing.safetensors", **{"refalign.dit_config": {"num_attention_heads": 2}}),
            "missing", "blocks.1.cross_attn.q.bias")
    extra = dict(base, **{"blocks.0.lora_down.weight": torch.zeros(2, 2)})
    refused(write(tmp_path, extra, "extra.safetensors", **{"refalign.dit_config": {"num_attention_heads": 2}}),
            "unexpected", "blocks.0.lora_down.weight")


def test_official_training_projectors_are_ignored(dit, tmp_path):
    tensors = dict(dit_state_dict_original(dit), **{"blocks.0.input_mlp.proj.0.weight": torch.zeros(16, 32)})
    path = write(tmp_path, tensors, **{"refalign.dit_config": {"num_attention_heads": 2}})
    assert same_weights(dit, load_dit(path))


def test_refuses_pickles_truncated_files_and_missing_files(dit, tmp_path):
    torch.save(dit.state_dict(), tmp_path / "model.pt")
    refused(tmp_path / "model.pt", "pickle")
    (tmp_path / "sneaky.safetensors").write_bytes((tmp_path / "model.pt").read_bytes())
    refused(tmp_path / "sneaky.safetensors", "pickle")
    save_dit(dit, tmp_path / "full.safetensors")
    data = (tmp_path / "full.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    refused(tmp_path / "cut.safetensors", "truncated or corrupt")
    (tmp_path / "garbage.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    refused(tmp_path / "garbage.safetensors", "truncated or corrupt")
    refused(tmp_path / "nothing.safetensors", "does not exist")


def test_head_count_needs_metadata_when_not_inferable(dit, tmp_path):
    path = write(tmp_path, dit_state_dict_original(dit))  # dim 32 is not a multiple of 128, and no metadata
    refused(path, "attention heads")


def test_sharded_index_loads(dit, tmp_path):
    original = dit_state_dict_original(dit)
    keys = sorted(original)
    shards = {"a.safetensors": keys[: len(keys) // 2], "b.safetensors": keys[len(keys) // 2 :]}
    meta = {"refalign.dit_config": json.dumps({"num_attention_heads": 2})}
    for name, names in shards.items():
        save_file({k: original[k] for k in names}, tmp_path / name, metadata=meta)
    index = {"weight_map": {k: name for name, names in shards.items() for k in names}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    assert same_weights(dit, load_dit(tmp_path))
    (tmp_path / "b.safetensors").unlink()
    refused(tmp_path, "shard", "missing")


def test_saving_is_atomic(dit, tmp_path, monkeypatch):
    import refalign_core.models.safetensors_io as io

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(io, "save_file", crash)
    with pytest.raises(RuntimeError):
        save_dit(dit, tmp_path / "m.safetensors")
    assert list(tmp_path.iterdir()) == []
