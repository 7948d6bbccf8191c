"""Bad input to the command line (`python -m refalign_core`): generate, bundles, encode commands, the demo: one clear
error each, before any output (`bad_input.py`)."""

import pytest

from bad_input import Case, TOY, check_case, check_table, command, generate

CASES = [
    # generate: sizes, numbers and choices
    Case("width 0", generate("--width", "0"), 2, "width"),
    Case("width negative", generate("--width", "-16"), 2, "width"),
    Case("width not a multiple of 16", generate("--width", "100"), 2, "multiples of 16"),
    Case("frames not 4n+1", generate("--num-frames", "6"), 2, "4n+1"),
    Case("steps 0", generate("--steps", "0"), 2, "steps"),
    Case("shift nan", generate("--shift", "nan"), 2, "shift"),
    Case("shift 0", generate("--shift", "0"), 2, "shift"),
    Case("image scale nan", generate("--image-scale", "nan"), 2, "image_scale"),
    Case("text scale inf", generate("--text-scale", "inf"), 2, "text_scale"),
    Case("seed negative", generate("--seed", "-1"), 2, "seed"),
    Case("seed 2^64", generate("--seed", str(2 ** 64)), 2, "seed"),
    Case("guidance steps above steps", generate("--steps", "4", "--guidance-steps", "9"), 2, "guidance_steps"),
    Case("cache threshold negative", generate("--cache", "magcache", "--cache-threshold", "-1"), 2,
         "cache_threshold"),
    Case("sampler unknown", generate("--sampler", "ddim"), 2, "sampler"),
    Case("device without CUDA", generate("--device", "cuda"), 2, "--device cuda"),
    Case("device not a device", generate("--device", "gpu7"), 2, "--device"),
    # generate: outputs, checked before any model loads
    Case("out with an unknown suffix", generate("--out", "{o}/v.avi"), 2, "--out"),
    Case("out under a file", generate("--out", "{i}/a_file/v.mp4"), 2, "a_file"),
    Case("out is a folder", generate("--out", "{o}"), 2, "--out"),
    Case("fps 0", generate("--fps", "0"), 2, "--fps"),
    Case("fps nan", generate("--fps", "nan"), 2, "--fps"),
    Case("save-latents not safetensors", generate("--save-latents", "{o}/l.pt"), 2, "--save-latents"),
    Case("preview not png", generate("--preview", "{o}/p.jpg"), 2, "--preview"),
    Case("nothing to write", command("generate", "--bundle", TOY, "--prompt", "a", "--ref", "{i}/ref.png"), 2,
         "--out"),
    Case("no prompt", command("generate", "--bundle", TOY, "--ref", "{i}/ref.png", "--out", "{o}/v.mp4"), 2,
         "--prompt"),
    Case("no references", generate(ref=False), 2, "--ref"),
    # generate: references and masks
    Case("five references", generate(*["--ref", "{i}/ref.png"] * 4), 2, "at most 4"),
    Case("reference missing", generate("--ref", "{i}/missing.png"), 2, "missing.png"),
    Case("reference not an image", generate("--ref", "{i}/not_an_image.png"), 2, "not_an_image.png"),
    Case("more masks than references", generate("--mask", "{i}/mask.png", "--mask", "{i}/mask.png"), 2, "--mask"),
    Case("mask of another size", generate("--mask", "{i}/small_mask.png"), 2, "mask"),
    Case("mask empty", generate("--mask", "{i}/empty_mask.png"), 2, "mask is empty"),
    # generate: model files
    Case("dit missing", command("generate", "--dit", "{i}/none.safetensors", "--prompt", "a", "--ref",
                                "{i}/ref.png", "--out", "{o}/v.mp4"), 2, "none.safetensors"),
    Case("dit is a pickle", command("generate", "--dit", "{i}/model.pt", "--prompt", "a", "--ref", "{i}/ref.png",
                                    "--save-latents", "{o}/l.safetensors"), 2, "pickle"),
    Case("dit is a renamed pickle", command("generate", "--dit", "{i}/renamed_pickle.safetensors", "--prompt", "a",
                                            "--ref", "{i}/ref.png", "--save-latents", "{o}/l.safetensors"), 2,
         "pickle"),
    Case("dit truncated", command("generate", "--dit", "{i}/truncated.safetensors", "--prompt", "a", "--ref",
                                  "{i}/ref.png", "--save-latents", "{o}/l.safetensors"), 2, "truncated"),
    Case("dit garbage", command("generate", "--dit", "{i}/garbage.safetensors", "--prompt", "a", "--ref",
                                "{i}/ref.png", "--save-latents", "{o}/l.safetensors"), 2, "garbage.safetensors"),
    Case("dit heads unknowable", command("generate", "--dit", "{i}/no_metadata_dit.safetensors", "--prompt-embeds",
                                         "{i}/nan_prompt.safetensors", "--reference-latents",
                                         "{i}/small_refs.safetensors", "--width", "32", "--height", "32",
                                         "--save-latents", "{o}/l.safetensors"), 2, "head"),
    Case("vae missing", command("generate", "--dit", "{i}/toy_dit.safetensors", "--vae", "{i}/none.safetensors",
                                "--prompt", "a", "--ref", "{i}/ref.png", "--out", "{o}/v.mp4"), 2, "--vae"),
    Case("lora missing", generate("--lora", "{i}/none.safetensors"), 2, "none.safetensors"),
    Case("prompt embeds without the key", command("generate", "--bundle", TOY, "--prompt-embeds",
                                                  "{i}/no_keys.safetensors", "--ref", "{i}/ref.png", "--out",
                                                  "{o}/v.mp4"), 2, "prompt_embeds"),
    Case("reference latents without the key", generate("--reference-latents", "{i}/no_keys.safetensors"), 2,
         "reference_latents"),
    Case("reference latents NaN", command("generate", "--bundle", TOY, "--prompt", "a", "--reference-latents",
                                          "{i}/nan_refs.safetensors", "--out", "{o}/v.mp4"), 2, "NaN"),
    Case("reference latents of another size", command("generate", "--bundle", TOY, "--prompt", "a",
                                                      "--reference-latents", "{i}/small_refs.safetensors", "--out",
                                                      "{o}/v.mp4"), 2, "reference latents"),
    Case("prompt embeds NaN", command("generate", "--bundle", TOY, "--prompt-embeds", "{i}/nan_prompt.safetensors",
                                      "--ref", "{i}/ref.png", "--out", "{o}/v.mp4"), 2, "NaN"),
    # bundles
    Case("bundle missing", command("generate", "--bundle", "{i}/nowhere", "--prompt", "a", "--ref", "{i}/ref.png",
                                   "--out", "{o}/v.mp4"), 2, "nowhere"),
    Case("bundle and a VAE file", command("generate", "--bundle", TOY, "--vae", TOY / "vae.safetensors", "--prompt",
                                          "a", "--ref", "{i}/ref.png", "--out", "{o}/v.mp4"), 2, "vae: a bundle folder"),
    *[Case(f"bundle {name}", command("generate", "--bundle", f"{{i}}/bundle_{name}", "--prompt", "a", "--ref",
                                     "{i}/ref.png", "--out", "{o}/v.mp4"), 2, needle)
      for name, needle in [("notjson", "not a readable JSON"), ("list", "JSON object"), ("unknown", "colour"),
                           ("dit_number", "dit"), ("escape", "points outside"), ("defaults_list", "defaults"),
                           ("defaults_unknown", "stepz"), ("fps_text", "fps"), ("format", "format")]],
    # encode commands and the demo
    Case("encode-references size", command("encode-references", "--vae", "{i}/none.safetensors", "--ref",
                                           "{i}/ref.png", "--width", "30", "--out", "{o}/r.safetensors"), 2, "width"),
    Case("encode-references out suffix", command("encode-references", "--vae", TOY / "vae.safetensors", "--ref",
                                                 "{i}/ref.png", "--out", "{o}/r.pt"), 2, "--out"),
    Case("encode-prompt device", command("encode-prompt", "--text-encoder", TOY / "text_encoder", "--prompt", "a",
                                         "--device", "cuda", "--out", "{o}/p.safetensors"), 2, "--device"),
    Case("demo out under a file", command("demo", "--out", "{i}/a_file/demo"), 2, "a_file"),
    Case("demo seed", command("demo", "--out", "{o}/demo", "--seed", "-3"), 2, "seed"),
]


def test_there_are_enough_cases():
    check_table(CASES, 51)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_clear_error_before_any_output(case, bad_inputs, tmp_path, capsys):
    check_case(case, bad_inputs, tmp_path, capsys)
