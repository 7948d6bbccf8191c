"""Parity of the native ComfyUI path with our reference implementation, inside a real ComfyUI on the CPU (fp32).

    python tools/comfyui_parity.py /path/to/ComfyUI [--skip-compile]

1. forward: the RefAlign-patched native `WanModel` vs our `RefAlignTransformer3DModel`, same random weights saved in
   original Wan naming, K = 0..3 references; a Wan-shaped tiny model (loaded by ComfyUI's own loader) and a
   toy-shaped one (other head count / text width: ComfyUI's model config with those values); and the patched MODEL's
   patches copied onto a second model instance, as 0.38's `clone(model_override=…)` does;
2. sampling: the embedded toy model through RefAlign Loader (MODEL, CLIP, VAE) → CLIP Text Encode → R2V Sampler, and
   through Subject Conditioning → RefAlign Guider → SamplerCustomAdvanced, vs the core path (our DiT and the bundle's
   VAE and text encoder), same seed / steps, euler and unipc; DualCFGGuider vs our guider on the same conds;
3. LoRA: a LoRA exported by the trainer's exporter (`lora_state_dict_for_comfyui`, what train/train.py writes) loaded
   with LoraLoaderModelOnly on the patched MODEL (and before the patch) vs our DiT with the LoRA merged;
4. composition (reported, not part of the max): zero references = unpatched model bit for bit, TorchCompileModel,
   EasyCache.

Prints every figure; the last line is `max diff: <value>` over 1–3. Runs in ComfyUI's Python environment after
`pip install -e .` of this pack (or from a checkout: the repository root is put on the import path); it needs none of
the pack's extras."""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1]),
                str(Path(__file__).resolve().parents[1] / "tests")]  # tests/: the tiny random models
from comfyui_env import make_torchvision_importable, open_comfyui, run_diffusion_model, run_node  # noqa: E402

make_torchvision_importable()

from refalign_core.inference.bundles import embedded_bundles, read_bundle  # noqa: E402
from refalign_core.models.checkpoint import dit_from_state_dict, dit_state_dict_original, save_dit  # noqa: E402
from refalign_core.toy.demo import DEMO_PROMPT, demo_references  # noqa: E402
from refalign_core.models.lora import merge_lora  # noqa: E402
from tiny_models import tiny_dit  # noqa: E402
from refalign_core.models.vae import wan21_to_dit_space  # noqa: E402
from refalign_core.training import LORA_TARGETS, lora_state_dict_for_comfyui  # noqa: E402

WAN_SHAPED = dict(num_attention_heads=2, attention_head_dim=128, text_dim=4096, freq_dim=256, ffn_dim=512,
                  num_layers=2)  # what ComfyUI's detection assumes: 128-wide heads, 4096-d text, 256-d sinusoid
TOY_SHAPED = dict(num_attention_heads=2, attention_head_dim=32, text_dim=64, freq_dim=64, ffn_dim=128, num_layers=3)
FIGURES = {}


def report(name: str, value: float, counted: bool = True) -> None:
    if counted:
        FIGURES[name] = value
    print(f"{name}: {value:.3g}" if isinstance(value, float) else f"{name}: {value}", flush=True)


def randomised(dit):
    """Non-trivial weights everywhere (diffusers zero-initialises some tables)."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in dit.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return dit


def forward_inputs(dit, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, 3, 6, 8, generator=g)
    refs = torch.randn(1, 16, k, 6, 8, generator=g) if k else None
    return x, torch.tensor([700.0]), torch.randn(1, 12, dit.config.text_dim, generator=g), refs


def check_forward(pack, folder: Path) -> None:
    native = pack.nodes.native
    for label, config in (("wan-shaped (ComfyUI's loader)", WAN_SHAPED), ("toy-shaped (config overrides)", TOY_SHAPED)):
        dit = randomised(tiny_dit(0, **config))
        path = folder / f"{label.split()[0]}.safetensors"
        save_dit(dit, path)
        plain = native.load_native_dit(path, patch=False)
        patched = run_node(pack, "RefAlignModelPatch", plain)[0]
        for k in range(4):
            x, t, context, refs = forward_inputs(dit, k)
            with torch.no_grad():
                ours = dit(x, t, context, reference_latents=refs).sample
            got = run_diffusion_model(patched, x, t, context, refs)
            report(f"forward {label}, K={k}: |patched native − ours|", (got - ours).abs().max().item())
            unpatched = run_diffusion_model(plain, x, t, context, refs)
            if k == 2 and hasattr(plain, "cached_patcher_init"):
                factory, args = plain.cached_patcher_init  # what multi-GPU clones / non-dynamic delegates call
                rebuilt = factory(*args, disable_dynamic=True)
                report("  cached_patcher_init rebuilds the unpatched model: |rebuilt − unpatched|",
                       (run_diffusion_model(rebuilt, x, t, context, refs) - unpatched).abs().max().item())
            if k == 0:
                report("  K=0: patched == unpatched native bit for bit", bool(torch.equal(got, unpatched)), False)
            else:
                report(f"  K={k}: |unpatched native − ours| (what the patch fixes)",
                       (unpatched - ours).abs().max().item(), False)


def check_clone_onto_another_instance(pack, folder: Path) -> None:
    """What ComfyUI 0.38's `clone(model_override=…)` does (MultiGPU CFG split, Select Model Device, non-dynamic
    delegates): a patcher of a second model instance gets the patched one's object patches and wrappers verbatim. It
    must run its own modules: the same output as ours, and the first instance's cross-attention never runs."""
    native = pack.nodes.native
    path = folder / "wan-shaped.safetensors"
    dit = randomised(tiny_dit(0, **WAN_SHAPED))
    first = native.load_native_dit(path, patch=False)
    patched = run_node(pack, "RefAlignModelPatch", first)[0]
    replica = native.load_native_dit(path, patch=False)
    assert replica.model is not patched.model
    replica.object_patches = patched.object_patches.copy()
    replica.wrappers = {kind: {key: list(w) for key, w in by_key.items()} for kind, by_key in patched.wrappers.items()}
    touched = []
    hooks = [block.cross_attn.q.register_forward_hook(lambda *_: touched.append(1))
             for block in patched.model.diffusion_model.blocks]
    try:
        for k in (0, 2):
            x, t, context, refs = forward_inputs(dit, k)
            with torch.no_grad():
                ours = dit(x, t, context, reference_latents=refs).sample
            got = run_diffusion_model(replica, x, t, context, refs)
            report(f"clone onto a second model instance, K={k}: |replica − ours|", (got - ours).abs().max().item())
    finally:
        for hook in hooks:
            hook.remove()
    report("  the first instance's cross-attention ran on the replica's calls", bool(touched), False)
    if touched:
        FIGURES["clone onto a second model instance: first instance untouched"] = float("inf")


def toy_inputs(pack, loaded):
    """(references, positive, negative, defaults) for the demo case at 64×64, through core CLIP Text Encode."""
    import nodes as comfy_nodes

    images = [torch.from_numpy(np.asarray(im.convert("RGB"))).float().div(255)[None] for im in demo_references()]
    references = run_node(pack, "RefAlignMultiSubjectReference", 64, 64, image_1=images[0], image_2=images[1])[0]
    encode = comfy_nodes.CLIPTextEncode().encode
    clip = loaded[1]
    return references, encode(clip, DEMO_PROMPT)[0], encode(clip, "")[0], read_bundle(toy_bundle()[1]).settings


def toy_sampling(pack, sampler_name: str, model, loaded, steps=None, **controls):
    """The R2V Sampler on the demo case -> (frames, latent in DiT space); controls: its optional inputs."""
    references, positive, negative, defaults = toy_inputs(pack, loaded)
    frames, latent = run_node(
        pack, "RefAlignR2VSampler", model, positive, negative, loaded[2], references, 64, 64, defaults.num_frames, steps or defaults.steps,
        defaults.shift, defaults.image_scale, defaults.text_scale, 0, sampler_name, "zeros_per_reference", **controls)
    return frames, wan21_to_dit_space(latent["samples"])


def core_sampling(sampler_name: str, loras=(), **controls):
    """The core path (our DiT, the bundle's VAE and text encoder) on the same case -> latents in DiT space;
    controls: settings on top."""
    import dataclasses

    from refalign_core.inference.pipeline import RefAlignPipeline

    pipe = RefAlignPipeline.from_bundle(toy_bundle()[1], loras=tuple(loras))
    settings = dataclasses.replace(pipe.settings, width=64, height=64, seed=0, sampler=sampler_name, **controls)
    return pipe(DEMO_PROMPT, demo_references(), negative_prompt="", settings=settings).latents


class Noise:
    """SamplerCustomAdvanced's NOISE with the core's noise for `seed`."""

    def __init__(self, seed: int):
        self.seed = seed

    def generate_noise(self, latent):
        from refalign_core.inference.sampler import initial_noise
        return initial_noise(tuple(latent["samples"].shape), self.seed)


def modular_wiring(pack, model, loaded):
    """Subject Conditioning → RefAlign Guider on the demo case at 64×64 -> (conds, guider, a function that runs
    SamplerCustomAdvanced (our sampler, the core's sigmas) with a noise seed on a LATENT and returns the LATENT)."""
    import comfy_extras.nodes_custom_sampler as custom
    from refalign_core.inference.sampler import SamplingSettings, make_scheduler

    references, positive, negative, d = toy_inputs(pack, loaded)
    conds = run_node(pack, "RefAlignSubjectConditioning", positive, negative, loaded[2], references, 64, 64,
                     d.num_frames, 1, "zeros_per_reference")
    guider = run_node(pack, "RefAlignGuider", model, *conds[:3], d.image_scale, d.text_scale)[0]
    settings = SamplingSettings(width=64, height=64, num_frames=d.num_frames, steps=d.steps, shift=d.shift)
    sigmas = make_scheduler("euler", d.steps, d.shift).sigmas.float()
    node = custom.SamplerCustomAdvanced
    run = node.execute if hasattr(node, "execute") else node().sample

    def sample(seed: int, latent: dict) -> dict:
        out = run(Noise(seed), guider, pack.nodes.native.schedule_sampler(settings), sigmas, latent)
        return (out.result if hasattr(out, "result") else out)[0]

    return conds, guider, sample


def modular_sampling(pack, model, loaded):
    """Subject Conditioning → RefAlign Guider → SamplerCustomAdvanced -> latents in DiT space."""
    conds, _, sample = modular_wiring(pack, model, loaded)
    return wan21_to_dit_space(sample(0, conds[3])["samples"])


def extension_sampling(pack, model, loaded, segments: int = 2):
    """Segments through Subject Conditioning → RefAlign Guider → SamplerCustomAdvanced (noise seed = segment index)
    → VAE Decode, continued by RefAlign Segment Latent and joined by RefAlign Join Segments -> (frames, the core's
    frames for `Extension(segments, overlap=1, color_match=True)`)."""
    import nodes as comfy_nodes

    from refalign_core.inference.extension import Extension
    from refalign_core.inference.pipeline import RefAlignPipeline

    conds, _, sample = modular_wiring(pack, model, loaded)
    num_frames = toy_inputs(pack, loaded)[3].num_frames
    video, latent = None, conds[3]
    for index in range(segments):
        if video is not None:
            latent = run_node(pack, "RefAlignSegmentLatent", loaded[2], video, 64, 64, num_frames, 1, 1)[0]
        frames = comfy_nodes.VAEDecode().decode(loaded[2], sample(index, latent))[0]
        video = frames if video is None else run_node(pack, "RefAlignJoinSegments", video, frames, 1, True)[0]
    pipe = RefAlignPipeline.from_bundle(toy_bundle()[1])
    core = pipe(DEMO_PROMPT, demo_references(), negative_prompt="", settings=pipe.settings.replace(width=64, height=64),
                extension=Extension(segments=segments, overlap=1, color_match=True))
    return video, core.frames


def toy_bundle() -> tuple[str, Path]:
    """The embedded RefAlign toy bundle: (its name in the Loader's list, its folder)."""
    name, folder = next(iter(embedded_bundles().items()))
    return name, folder


def random_lora(dit, rank: int = 4, seed: int = 5) -> dict[str, torch.Tensor]:
    """A random LoRA on `LORA_TARGETS` of `dit` in peft's state-dict naming (what the trainer holds), without peft."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, module in dit.named_modules():
        if isinstance(module, torch.nn.Linear) and name.startswith("blocks.") and name.endswith(tuple(LORA_TARGETS)):
            state[f"{name}.lora_A.default.weight"] = torch.randn(rank, module.in_features, generator=generator) * 0.1
            state[f"{name}.lora_B.default.weight"] = torch.randn(module.out_features, rank, generator=generator) * 0.1
    return state


def check_sampling(pack, skip_compile: bool) -> None:
    import comfy_extras.nodes_easycache as easycache
    import comfy_extras.nodes_model_advanced as advanced
    import comfy_extras.nodes_torch_compile as torch_compile

    loaded = run_node(pack, "RefAlignLoader", toy_bundle()[0], "default")
    report("loader gives (MODEL, CLIP, VAE)", ", ".join(type(x).__name__ for x in loaded), False)
    model = loaded[0]
    native = advanced.ModelSamplingSD3().patch(model, 1.0)[0]
    for sampler_name in ("euler", "unipc"):
        start = time.perf_counter()
        core = core_sampling(sampler_name)
        middle = time.perf_counter()
        _, latent = toy_sampling(pack, sampler_name, native, loaded)
        end = time.perf_counter()
        report(f"toy through RefAlign Loader → R2V Sampler ({sampler_name}) vs the core path: |diff| latents",
               (latent - core).abs().max().item())
        report(f"  wall s: core {middle - start:.2f}, native {end - middle:.2f}", "", False)
    core = core_sampling("euler")
    report("toy through Subject Conditioning → RefAlign Guider → SamplerCustomAdvanced vs the core path: |diff| "
           "latents", (modular_sampling(pack, model, loaded) - core).abs().max().item())
    controls = {"reference_strength": 0.5, "image_guidance_start": 0.25, "image_guidance_end": 0.75}
    report(f"R2V Sampler with {controls} vs the core path: |diff| latents",
           (toy_sampling(pack, "euler", native, loaded, **controls)[1] - core_sampling("euler", **controls))
           .abs().max().item())
    report("  the same at reference_strength 0 (references hidden), vs the core path: |diff| latents",
           (toy_sampling(pack, "euler", native, loaded, reference_strength=0.0)[1]
            - core_sampling("euler", reference_strength=0.0)).abs().max().item())
    video, core_frames = extension_sampling(pack, model, loaded, segments=3)
    report(f"3 segments through Segment Latent → SamplerCustomAdvanced → Join Segments ({len(video)} frames) vs the "
           "core's extension: |diff| frames", (video.cpu() - core_frames).abs().max().item())
    other_shift = advanced.ModelSamplingSD3().patch(model, 5.0)[0]
    report("ModelSamplingSD3 shift 5 instead of 1 (the sampler's own shift widget decides): |diff|",
           (toy_sampling(pack, "euler", other_shift, loaded)[1] - core).abs().max().item(), False)

    cached = easycache.EasyCacheNode.execute(model, 0.2, 0.15, 0.95, False).result[0]
    start = time.perf_counter()
    difference = toy_sampling(pack, "euler", cached, loaded)[1] - core
    report(f"EasyCache (0.2) on the patched MODEL: runs ({time.perf_counter() - start:.2f} s), latent RMSE to the "
           f"uncached run (uncached std {core.std().item():.3f})", difference.pow(2).mean().sqrt().item(), False)
    if not skip_compile:
        compiled = torch_compile.TorchCompileModel.execute(model, "inductor").result[0]
        start = time.perf_counter()
        try:
            latent = toy_sampling(pack, "euler", compiled, loaded)[1]
            report(f"TorchCompileModel (inductor, CPU) on the patched MODEL ({time.perf_counter() - start:.1f} s incl. "
                   "compile): |diff| latents", (latent - core).abs().max().item(), False)
        except Exception as e:  # report, do not hide
            report("TorchCompileModel (inductor, CPU) failed", f"{type(e).__name__}: {str(e)[:300]}", False)


def check_turbo(pack, folder: Path) -> None:
    """The shipped toy turbo student through LoraLoaderModelOnly on the RefAlign Loader's MODEL and the R2V Sampler's
    turbo preset, against the core with the LoRA merged and `--preset turbo`."""
    import shutil

    import folder_paths
    import nodes as comfy_nodes

    from refalign_core.inference.sampler import PRESETS
    from refalign_core.models.lora import LoraSpec
    from refalign_core.toy.demo import SHIPPED_TURBO

    (folder / "loras").mkdir(exist_ok=True)
    shutil.copy(SHIPPED_TURBO, folder / "loras" / "refalign_toy_turbo.safetensors")
    folder_paths.add_model_folder_path("loras", str(folder / "loras"))
    loaded = run_node(pack, "RefAlignLoader", toy_bundle()[0], "default")
    student = comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(loaded[0], "refalign_toy_turbo.safetensors",
                                                                     1.0)[0]
    native = toy_sampling(pack, "euler", student, loaded, preset="turbo")[1]
    turbo = {k: v for k, v in PRESETS["turbo"].items() if k != "sampler"}
    core = core_sampling(PRESETS["turbo"]["sampler"], loras=(LoraSpec(str(SHIPPED_TURBO), 1.0),), **turbo)
    report("toy turbo student: LoraLoaderModelOnly + R2V Sampler preset turbo vs the core with the LoRA merged and "
           "--preset turbo: |diff| latents", (native - core).abs().max().item())


def check_dual_cfg(pack, folder: Path) -> None:
    """DualCFGGuider (regular) with cfg_conds = s_txt, cfg_cond2_negative = s_img == our three-pass guider."""
    import comfy.latent_formats
    import comfy_extras.nodes_custom_sampler as custom

    native = pack.nodes.native
    from refalign_core.inference.sampler import SamplingSettings, initial_noise, make_scheduler
    model = native.load_native_dit(folder / "toy-shaped.safetensors")
    g = torch.Generator().manual_seed(3)
    fmt = comfy.latent_formats.Wan21()
    refs = fmt.process_out(torch.randn(1, 16, 2, 6, 8, generator=g))
    zeros = fmt.process_out(torch.zeros(1, 16, 2, 6, 8))
    positive, negative = [[torch.randn(1, 12, 64, generator=g), {}]], [[torch.randn(1, 12, 64, generator=g), {}]]
    conds = native.subject_conditioning(positive, negative, refs, zeros)
    settings = SamplingSettings(width=64, height=48, num_frames=9, steps=4)
    sigmas = make_scheduler("euler", 4, 5.0).sigmas.float()
    latent = torch.zeros(1, 16, 3, 6, 8)
    noise = initial_noise(tuple(latent.shape), 0)
    ours = native.guider_class()(model)
    ours.set_conds(*conds)
    ours.set_scales(5.0, 7.5)
    dual = custom.Guider_DualCFG(model)
    dual.set_conds(*conds)
    dual.set_cfg(7.5, 5.0)
    a = ours.sample(noise, latent, native.schedule_sampler(settings), sigmas, seed=0)
    b = dual.sample(noise, latent, native.schedule_sampler(settings), sigmas, seed=0)
    report("DualCFGGuider vs RefAlign guider (same sampler): |diff| latents", (a - b).abs().max().item())


def check_lora(pack, folder: Path) -> None:
    import folder_paths
    import nodes as comfy_nodes

    native = pack.nodes.native
    base = randomised(tiny_dit(0, **TOY_SHAPED))
    save_dit(base, folder / "lora_base.safetensors")
    lora = lora_state_dict_for_comfyui(random_lora(base), alpha=8)
    from safetensors.torch import save_file
    (folder / "loras").mkdir(exist_ok=True)
    save_file(lora, folder / "loras" / "refalign_test_lora.safetensors")
    folder_paths.add_model_folder_path("loras", str(folder / "loras"))
    strength = 0.8
    merged = dit_from_state_dict(merge_lora(dit_state_dict_original(base), lora, strength),
                                 {"refalign.dit_config": json.dumps({"num_attention_heads": 2})})
    loader = comfy_nodes.LoraLoaderModelOnly()
    patched = native.load_native_dit(folder / "lora_base.safetensors")
    after = loader.load_lora_model_only(patched, "refalign_test_lora.safetensors", strength)[0]
    plain = native.load_native_dit(folder / "lora_base.safetensors", patch=False)
    before = run_node(pack, "RefAlignModelPatch",
                      loader.load_lora_model_only(plain, "refalign_test_lora.safetensors", strength)[0])[0]
    report(f"LoRA modules mapped by ComfyUI: {len(after.patches)} weights for "
           f"{sum(k.endswith('.lora_down.weight') for k in lora)} LoRA modules", "", False)
    for k in (0, 2):
        x, t, context, refs = forward_inputs(base, k, seed=2)
        with torch.no_grad():
            expected = merged(x, t, context, reference_latents=refs).sample
        for where, model in (("after", after), ("before", before)):
            got = run_diffusion_model(model, x, t, context, refs)
            report(f"LoRA (strength {strength}) loaded {where} the patch, K={k}: |native − ours merged|",
                   (got - expected).abs().max().item())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("comfyui", help="ComfyUI folder (holding main.py)")
    parser.add_argument("--skip-compile", action="store_true", help="skip the TorchCompileModel trial (slow on CPU)")
    args = parser.parse_args()
    torch.manual_seed(0)
    pack = open_comfyui(args.comfyui)
    import comfyui_version
    print(f"ComfyUI {comfyui_version.__version__} from {args.comfyui}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        check_forward(pack, folder)
        check_clone_onto_another_instance(pack, folder)
        check_dual_cfg(pack, folder)
        check_lora(pack, folder)
        check_turbo(pack, folder)
        check_sampling(pack, args.skip_compile)
    print(f"max diff: {max(FIGURES.values()):.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
