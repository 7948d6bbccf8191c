"""Command line: `python -m refalign_core {generate,encode-prompt,encode-references,demo,eval,prepare} ...`."""

import argparse
import contextlib
import importlib
import io
import os
import sys
from fractions import Fraction
from pathlib import Path

import torch
import transformers
from tqdm import tqdm

from .errors import RefAlignInputError, run_command
from .files import OutputLock, write_atomic
from .inference.acceleration import ATTENTION_BACKENDS
from .inference.bundles import Bundle, read_bundle
from .inference.caching import CACHES
from .inference.extension import SEAMS, Extension
from .inference.memory import check_memory, memory_estimate
from .inference.pipeline import PipelineSpec, RefAlignPipeline, VAECodec, load_pipeline
from .inference.reference_files import load_reference_latents, save_reference_latents
from .inference.references import MAX_REFERENCES, Reference, encode_references, prepare_references
from .inference.sampler import (PRESETS, SAMPLERS, UNCOND_REFERENCES, SamplingSettings, check_positions,
                                check_reference_latents, check_text_embeddings, with_preset)
from .inference.video_io import VIDEO_SUFFIXES, load_image, video_rate, write_video
from .models.checkpoint import COMPUTE_DTYPES, DTYPES, read_dit_header
from .models.lora import LoraSpec
from .models.safetensors_io import read_safetensors, write_safetensors
from .models.text_encoder import WAN_NEGATIVE_PROMPT, check_prompt_text, encode_prompts, load_text_encoder
from .models.vae import load_vae
from .paths import check_output_folder



def _progress_callback(bar):
    def callback(step, total, latents):
        bar.update(1)
    return callback


def _preview_callback(pipe: RefAlignPipeline, path: str):
    """Rewrites the PNG at `path` (atomically) with a latent preview after every step."""
    from .inference.pipeline import VAECodec
    from .inference.previews import LatentPreview
    if pipe.vae is None:
        raise RefAlignInputError("--preview needs a VAE (--vae or a bundle with one)")

    def write(step, steps, image):
        png = io.BytesIO()
        image.save(png, format="PNG")
        write_atomic(path, png.getvalue())

    return LatentPreview(VAECodec(pipe.vae), write)


def _check_device(device: str) -> None:
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError) as e:
        raise RefAlignInputError(f"--device {device!r} is not a device (cpu, cuda, cuda:1, mps …)") from e
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(),
                 "xpu": hasattr(torch, "xpu") and torch.xpu.is_available()}
    if not available.get(kind, False):
        raise RefAlignInputError(f"--device {device}: no {kind} device is available here")


def _check_output(path: str | None, option: str, suffixes: tuple[str, ...]) -> None:
    """An output file's name and folder, checked before any work."""
    if path is None:
        return
    target = Path(path)
    if target.suffix.lower() not in suffixes:
        raise RefAlignInputError(f"{option} {path}: must end in {' or '.join(suffixes)}")
    if target.is_dir():
        raise RefAlignInputError(f"{option} {path} is a folder; give a file name")
    check_output_folder(target.parent, option)


def _check_input_file(path: str | None, option: str) -> None:
    if path is not None and not Path(path).exists():
        raise RefAlignInputError(f"{option} {path} does not exist")


def _files(path, option: str) -> list[tuple[Path, str]]:
    """An input file, or every file in an input folder, with its option."""
    if path is None:
        return []
    path = Path(path)
    return [(f, option) for f in path.rglob("*") if f.is_file()] if path.is_dir() else [(path, option)]


def _check_outputs_spare_inputs(outputs: list[tuple[str | None, str]], inputs: list[tuple[Path, str]]) -> None:
    """An output that is (the same file as) an input would overwrite the user's file: refused."""
    for out, out_option in outputs:
        if out is None or not Path(out).exists():
            continue
        for given, option in inputs:
            with contextlib.suppress(OSError):
                if os.path.samefile(out, given):
                    raise RefAlignInputError(f"{out_option} {out} is the {option} input {given}: an output must not "
                                             "overwrite an input")


def _hold(stack: contextlib.ExitStack, outputs: list[tuple[str | None, str]]) -> None:
    """Lock every output for this run (`files.OutputLock`): a second run writing one of them is refused now, not
    after its sampling."""
    for path, option in outputs:
        if path is not None:
            stack.enter_context(OutputLock(path, option))


class _Renamed(argparse.Action):
    """An option renamed in 0.2: still read, with a warning naming the new one, until 0.3."""

    def __init__(self, *args, new: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.new = new

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"warning: {option_string} is deprecated and will be removed in 0.3: use {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def _fps(text: str) -> Fraction:
    """--fps exactly as given: a decimal (23.976) or a ratio (24000/1001)."""
    try:
        return Fraction(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"not a number or a ratio like 24000/1001: {text!r}") from None


def _pipeline_spec(args, settings: SamplingSettings) -> PipelineSpec:
    return PipelineSpec(bundle=args.bundle, dit=args.dit, vae=args.vae,
                        text_encoder=args.text_encoder, settings=settings, fps=args.fps, device=args.device,
                        compute_dtype=DTYPES[args.compute_dtype], weight_dtype=DTYPES.get(args.weight_dtype),
                        vae_tiling=args.vae_tiling, loras=tuple(LoraSpec.parse(text) for text in args.lora or ()),
                        attention_backend=args.attention_backend, compile=args.compile)


def _add_model_args(p):
    p.add_argument("--bundle", help="bundle folder (refalign_bundle.json), instead of --dit/--vae/--text-encoder")
    p.add_argument("--dit", help="RefAlign / Wan2.1-T2V DiT .safetensors (original, ComfyUI or diffusers naming)")
    p.add_argument("--vae", help="Wan2.1 VAE .safetensors")
    p.add_argument("--text-encoder", help="folder with umT5 (config.json + safetensors) and its tokenizer")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compute-dtype", choices=COMPUTE_DTYPES, default="fp32")
    p.add_argument("--weight-dtype", choices=list(DTYPES), help="storage dtype of the DiT weights (default: compute)")
    p.add_argument("--vae-tiling", action="store_true", help="decode in spatial tiles to bound VAE memory")
    p.add_argument("--lora", action="append", metavar="FILE[:STRENGTH]",
                   help="LoRA (ComfyUI/our trainer, kohya, diffusers/peft or lightx2v format), strength 1 by "
                        "default; repeat for several")
    p.add_argument("--attention-backend", choices=list(ATTENTION_BACKENDS), default="native",
                   help="attention kernels (flash / sage need their package and a CUDA GPU; else native)")
    p.add_argument("--compile", action="store_true", help="regional torch.compile of the DiT blocks")


def _references(args, fit: tuple[int, int]) -> list[Reference]:
    """--ref images paired with their --mask files (same order); `fit`: the video's (width, height). The count
    (1–4) is checked by `prepare_references`."""
    refs, masks = args.ref or [], args.mask or []
    if len(masks) > len(refs):
        raise RefAlignInputError(f"--mask: {len(masks)} masks for {len(refs)} --ref images")
    return [Reference(load_image(path, fit if i >= len(masks) else None),
                      load_image(masks[i]).convert("L") if i < len(masks) else None, name=path)
            for i, path in enumerate(refs)]


def _tensors(path: str, option: str, key: str) -> dict[str, torch.Tensor]:
    """The tensors of `path`, which must hold `key`."""
    tensors, _ = read_safetensors(path, option)
    if key not in tensors:
        raise RefAlignInputError(f"{option} {path} holds no '{key}' tensor (it has {sorted(tensors)[:6]})")
    return tensors


def _settings(args, bundle: Bundle | None) -> SamplingSettings:
    """The bundle's (or the official) defaults with the command line's changes, validated before any model loads."""
    names = ("width", "height", "num_frames", "steps", "shift", "image_scale", "text_scale", "reference_strength",
             "image_guidance_start", "image_guidance_end", "sampler", "seed", "uncond_references", "guidance_steps",
             "cache", "cache_threshold", "cache_interval")
    options = {k: getattr(args, k) for k in names if getattr(args, k) is not None}
    if args.text_kv_cache:
        options["text_kv_cache"] = True
    base = with_preset(bundle.settings if bundle else SamplingSettings(), args.preset)
    return base.replace(source="command line", **options)


def _check_run_fits(args, dit, vae, text_encoder, settings: SamplingSettings, extension: Extension,
                    embeds: dict) -> None:
    """The given embeddings, the video within the DiT's RoPE positions and the run within free memory, from the DiT
    file's header alone: found before any weight is read or any tensor of the video's size is made."""
    config, parameters = read_dit_header(dit)
    check_text_embeddings({"--prompt-embeds prompt_embeds": embeds.get("prompt_embeds"),
                           "--prompt-embeds negative_prompt_embeds": embeds.get("negative_prompt_embeds")},
                          config["text_dim"])
    num_references = embeds["reference_latents"].shape[2] if "reference_latents" in embeds else len(args.ref)
    check_positions(settings, config, num_references)
    weight_dtype = DTYPES.get(args.weight_dtype) or DTYPES[args.compute_dtype]
    others = sum(path.stat().st_size for path, _ in _files(vae, "") + _files(text_encoder, ""))
    parts = memory_estimate(settings, config, num_references, compute_dtype=DTYPES[args.compute_dtype],
                            weight_bytes=parameters * torch.finfo(weight_dtype).bits // 8 + others,
                            decode=bool(args.out), device=args.device, extension=extension)
    check_memory(settings, parts, num_references, args.device)


def _checked_files(args, spec: PipelineSpec, bundle: Bundle | None) -> list[tuple[str | None, str]]:
    """Every input file exists, every output can be written and overwrites no input. Returns the outputs."""
    named = [(args.dit, "--dit"), (args.vae, "--vae"), (args.text_encoder, "--text-encoder"),
             (args.prompt_embeds, "--prompt-embeds"), (args.reference_latents, "--reference-latents"),
             *((lora.path, "--lora") for lora in spec.loras), *((path, "--ref") for path in args.ref or ()),
             *((path, "--mask") for path in args.mask or ())]
    for path, option in named:
        _check_input_file(path, option)
    outputs = [(args.out, "--out"), (args.save_latents, "--save-latents"), (args.preview, "--preview")]
    _check_output(args.out, "--out", VIDEO_SUFFIXES)
    _check_output(args.save_latents, "--save-latents", (".safetensors",))
    _check_output(args.preview, "--preview", (".png",))
    inputs = [file for path, option in named for file in _files(path, option)]
    if bundle:
        inputs += _files(bundle.folder, "--bundle")
    _check_outputs_spare_inputs(outputs, inputs)
    if not args.out and not args.save_latents:
        raise RefAlignInputError("give --out (a video) and / or --save-latents: nothing would be written")
    return outputs


def _reference_latents(path: str, settings: SamplingSettings, vae) -> torch.Tensor:
    """--reference-latents, checked against this run's size and, for a file with metadata when the run has a VAE,
    against that VAE (`reference_files`): the VAE file is read on the CPU for its probe, before the DiT loads."""
    encoded = load_reference_latents(path, width=settings.width, height=settings.height, what="--reference-latents")
    if encoded.checked and vae:
        encoded.check_vae(VAECodec(load_vae(vae)), "--reference-latents")
    return encoded.latents


def _given_tensors(args, settings: SamplingSettings, vae=None) -> dict[str, torch.Tensor]:
    """The prompt embeddings and reference latents given as files (checked; `vae`: the run's VAE file, if any), as
    `RefAlignPipeline` keywords; a prompt or references must come from somewhere."""
    for text, option in ((args.prompt, "--prompt"), (args.negative_prompt, "--negative-prompt")):
        if text is not None:
            check_prompt_text(text, option)
    embeds = {}
    if args.prompt_embeds:
        tensors = _tensors(args.prompt_embeds, "--prompt-embeds", "prompt_embeds")
        embeds = {"prompt_embeds": tensors["prompt_embeds"],
                  "negative_prompt_embeds": tensors.get("negative_prompt_embeds")}
    elif args.prompt is None:
        raise RefAlignInputError("--prompt or --prompt-embeds is required")
    if args.reference_latents:
        latents = _reference_latents(args.reference_latents, settings, vae)
        check_reference_latents(latents, settings, latents.shape[1])
        embeds["reference_latents"] = latents
    elif not args.ref:
        raise RefAlignInputError("at least one --ref image (or --reference-latents) is required")
    return embeds


def cmd_generate(args) -> None:
    # everything that can be wrong with the command is found before a model is loaded
    bundle = read_bundle(args.bundle) if args.bundle else None
    settings = _settings(args, bundle)
    extension = Extension(segments=args.segments, overlap=args.overlap, color_match=args.color_match, seam=args.seam)
    extension.check(settings)
    _check_device(args.device)
    if not args.bundle and not args.dit:
        raise RefAlignInputError("--dit (or --bundle) is required")
    spec = _pipeline_spec(args, settings)
    outputs = _checked_files(args, spec, bundle)
    dit, vae, text_encoder, _, fps = spec.model_files()
    if args.out:
        video_rate(fps, args.out, extension.total_frames(settings.num_frames), "--fps")
    embeds = _given_tensors(args, settings, vae)
    _check_run_fits(args, dit, vae, text_encoder, settings, extension, embeds)
    references = _references(args, (settings.width, settings.height))
    if references:
        prepare_references(references, settings.width, settings.height, MAX_REFERENCES)

    with contextlib.ExitStack() as stack:
        _hold(stack, outputs)
        pipe = load_pipeline(spec)
        if (args.out or extension.segments > 1) and pipe.vae is None:
            raise RefAlignInputError("--out and --segments need a VAE (--vae or a bundle with one); use "
                                     "--save-latents of one segment without it")
        preview = _preview_callback(pipe, args.preview) if args.preview else None
        with tqdm(total=settings.steps * extension.segments, desc="sampling", unit="step") as bar:
            progress = _progress_callback(bar)

            def callback(step, total, latents):
                progress(step, total, latents)
                if preview is not None:
                    preview(step, total, latents)

            result = pipe(args.prompt, references or None, negative_prompt=args.negative_prompt, settings=settings,
                          extension=extension, callback=callback, decode=bool(args.out), **embeds)
        if args.save_latents:
            write_safetensors({"latents": result.latents}, args.save_latents)
            print(f"latents: {args.save_latents}")
        if args.out:
            print(f"video: {write_video(result.frames, args.out, fps=fps)}")


def cmd_encode_prompt(args) -> None:
    _check_device(args.device)
    _check_output(args.out, "--out", (".safetensors",))
    _check_outputs_spare_inputs([(args.out, "--out")], _files(args.text_encoder, "--text-encoder"))
    prompts = [check_prompt_text(args.prompt, "--prompt"), check_prompt_text(args.negative_prompt or "",
                                                                             "--negative-prompt")]
    with contextlib.ExitStack() as stack:
        _hold(stack, [(args.out, "--out")])
        text_encoder = load_text_encoder(args.text_encoder, dtype=DTYPES[args.compute_dtype], device=args.device)
        prompt_embeds, negative = encode_prompts(text_encoder, prompts).split(1)
        write_safetensors({"prompt_embeds": prompt_embeds, "negative_prompt_embeds": negative}, args.out)
    print(f"prompt embeddings: {args.out}")


def cmd_encode_references(args) -> None:
    _check_device(args.device)
    _check_output(args.out, "--out", (".safetensors",))
    named = [(args.vae, "--vae"), *((path, "--ref") for path in args.ref), *((path, "--mask") for path in
                                                                             args.mask or ())]
    _check_outputs_spare_inputs([(args.out, "--out")], [f for path, option in named for f in _files(path, option)])
    SamplingSettings(width=args.width, height=args.height)  # checks the size
    references = _references(args, (args.width, args.height))
    fitted = prepare_references(references, args.width, args.height, MAX_REFERENCES)
    with contextlib.ExitStack() as stack:
        _hold(stack, [(args.out, "--out")])
        vae = load_vae(args.vae, dtype=DTYPES[args.compute_dtype], device=args.device)
        latents = encode_references(vae, fitted)
        save_reference_latents(args.out, latents, width=args.width, height=args.height, vae_probe=VAECodec(vae),
                               names=[Path(path).name for path in args.ref], what="--out")
    print(f"reference latents {tuple(latents.shape)}: {args.out}")


def cmd_demo(args) -> None:
    from .toy.demo import run_demo
    check_output_folder(Path(args.out), "--out")
    SamplingSettings(seed=args.seed)  # checks the seed
    with tqdm(desc="demo sampling", unit="step") as bar:
        paths = run_demo(Path(args.out), Path(args.bundle) if args.bundle else None, seed=args.seed,
                         progress=lambda step, total, _: (setattr(bar, "total", total), bar.update(1)),
                         preset=args.preset)
    print(paths["identity_report"].read_text(), end="")
    for name, path in paths.items():
        print(f"{name}: {path}")


def _preset_text(name: str) -> str:
    return ", ".join(f"{key} {value}" for key, value in PRESETS[name].items())


def _add_generate_parser(sub) -> None:
    g = sub.add_parser("generate", help="reference-to-video generation")
    _add_model_args(g)
    g.add_argument("--ref", action="append", help="reference image (repeat for 1-4 subjects)")
    g.add_argument("--mask", action="append", help="mask per reference (white = subject), same order as --ref")
    g.add_argument("--prompt")
    g.add_argument("--negative-prompt", default=WAN_NEGATIVE_PROMPT)
    g.add_argument("--prompt-embeds", help=".safetensors with prompt_embeds [+ negative_prompt_embeds]")
    g.add_argument("--reference-latents", help=".safetensors with reference_latents [1,16,K,H/8,W/8]")
    g.add_argument("--width", type=int)
    g.add_argument("--height", type=int)
    g.add_argument("--num-frames", type=int, help="video length, 4n+1")
    g.add_argument("--frames", type=int, dest="num_frames", action=_Renamed, new="--num-frames",
                   help=argparse.SUPPRESS)
    g.add_argument("--preset", choices=sorted(PRESETS),
                   help=f"turbo: a distilled student's schedule ({_preset_text('turbo')}; load the student with "
                        "--lora); the options below still apply on top")
    g.add_argument("--steps", type=int)
    g.add_argument("--shift", type=float)
    g.add_argument("--image-scale", type=float, help="s_img (default 5.0)")
    g.add_argument("--text-scale", type=float, help="s_txt (default 7.5)")
    g.add_argument("--reference-strength", type=float, help="how much the video attends to the references, 0–2 "
                                                             "(default 1: as trained; 0: not at all)")
    g.add_argument("--image-guidance-start", type=float, metavar="FRACTION",
                   help="the image pass (s_img) runs from this fraction of the steps (default 0) …")
    g.add_argument("--image-guidance-end", type=float, metavar="FRACTION",
                   help="… until this one (default 1); outside, a step runs u and c_txt only")
    g.add_argument("--sampler", choices=SAMPLERS)
    g.add_argument("--uncond-references", choices=UNCOND_REFERENCES)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--guidance-steps", type=int, metavar="N",
                   help="three-pass guidance on the first N steps, then the prompt pass alone (step-distill LoRAs: "
                        "e.g. --steps 4 --guidance-steps 1)")
    g.add_argument("--cache", choices=CACHES, help="skip DiT work between steps (diffusers cache hooks, lossy)")
    g.add_argument("--cache-threshold", type=float, help="first_block / magcache threshold (higher = faster)")
    g.add_argument("--cache-interval", type=int, help="taylorseer: full evaluation every N steps")
    g.add_argument("--text-kv-cache", action="store_true", help="reuse the text keys/values over the steps (exact)")
    g.add_argument("--segments", type=int, default=1, metavar="N",
                   help="a video of N clips, each continuing the last --overlap frames of the one before with the "
                        "same references (default 1)")
    g.add_argument("--overlap", type=int, default=Extension.overlap, metavar="FRAMES",
                   help=f"frames (4n+1) each new segment starts from (default {Extension.overlap})")
    g.add_argument("--color-match", action="store_true",
                   help="match each new segment's colours to the previous one on the overlap frames")
    g.add_argument("--seam", choices=SEAMS, default=Extension.seam,
                   help="pixels: re-encode the overlap frames as the start of a clip (default); latents: reuse the "
                        "previous clip's last latent frames")
    g.add_argument("--preview", help="write a preview PNG of the current latents here after every step")
    g.add_argument("--fps", type=_fps, help="frames per second, a decimal or a ratio (24000/1001); default: the "
                                            "bundle's, else 16. Each container stores its own range (video_io)")
    g.add_argument("--out", help="video file (.mp4, .webp, .gif)")
    g.add_argument("--save-latents", help="also write the latents [segments, 16, T', H/8, W/8] to this .safetensors")
    g.set_defaults(func=cmd_generate)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m refalign_core", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate_parser(sub)

    e = sub.add_parser("encode-prompt", help="precompute prompt embeddings")
    e.add_argument("--text-encoder", required=True)
    e.add_argument("--prompt", required=True)
    e.add_argument("--negative-prompt", default=WAN_NEGATIVE_PROMPT)
    e.add_argument("--out", required=True)
    e.add_argument("--device", default="cpu")
    e.add_argument("--compute-dtype", choices=COMPUTE_DTYPES, default="fp32")
    e.set_defaults(func=cmd_encode_prompt)

    r = sub.add_parser("encode-references", help="precompute reference latents")
    r.add_argument("--vae", required=True)
    r.add_argument("--ref", action="append", required=True)
    r.add_argument("--mask", action="append")
    r.add_argument("--width", type=int, default=832)
    r.add_argument("--height", type=int, default=480)
    r.add_argument("--out", required=True)
    r.add_argument("--device", default="cpu")
    r.add_argument("--compute-dtype", choices=COMPUTE_DTYPES, default="fp32")
    r.set_defaults(func=cmd_encode_references)

    d = sub.add_parser("demo", help="run the demo on the embedded default model")
    d.add_argument("--out", default="refalign_demo")
    d.add_argument("--bundle", help="use this bundle instead of the embedded one")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--preset", choices=sorted(PRESETS),
                   help=f"turbo: the embedded model's distilled student ({_preset_text('turbo')})")
    d.set_defaults(func=cmd_demo)

    for name, (_, help) in FORWARDED.items():  # listed here; their own parsers read their options
        sub.add_parser(name, help=f"{help} (python -m refalign_core {name} --help)", add_help=False)
    return parser


FORWARDED = {"eval": (".metrics.eval", "identity evaluation of generated videos against their references"),
             "prepare": (".training.report", "check a training dataset and write a report, before any model loads")}


def _run(argv) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in FORWARDED:
        return importlib.import_module(FORWARDED[argv[0]][0], __package__).main(argv[1:])
    args = build_parser().parse_args(argv)
    transformers.utils.logging.disable_progress_bar()
    args.func(args)
    return 0


def main(argv=None) -> int:
    return run_command(_run, argv)


if __name__ == "__main__":
    sys.exit(main())
