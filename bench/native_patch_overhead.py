"""Cost of the RefAlign Model Patch inside a real ComfyUI: the patched native Wan forward ÷ the unpatched native forward
on the same tokens (K = 2 references), CPU fp32, runs interleaved in one process. Goal: ≤ 1.00 (the reference tokens
skip text cross-attention, so the patched forward does less work).

    python bench/native_patch_overhead.py /path/to/ComfyUI [--runs N] [--layers L]

Configs: the tiny Wan-shaped model, and Wan2.1-1.3B block shapes (dim 1536, 12 heads, FFN 8960, 4096-d text, 512 text
tokens) on a 9×240×416 video, with `--layers` of its 30 blocks (random weights; the ratio is per block). Each config
prints the median of its per-run ratios; the last line is `ratio: <median>`, the larger of the two medians."""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / d) for d in ("tools", "tests")]
from comfyui_env import make_torchvision_importable, open_comfyui, run_diffusion_model  # noqa: E402

make_torchvision_importable()

from refalign_core.models.checkpoint import save_dit  # noqa: E402
from tiny_models import tiny_dit  # noqa: E402

WAN_1_3B = dict(num_attention_heads=12, attention_head_dim=128, text_dim=4096, freq_dim=256, ffn_dim=8960,
                in_channels=16, out_channels=16)
TINY = dict(num_attention_heads=2, attention_head_dim=128, text_dim=4096, freq_dim=256, ffn_dim=512, num_layers=2)


def measure(pack, folder: Path, label: str, config: dict, latent_shape, text_tokens: int, runs: int) -> list[float]:
    native = pack.nodes.native
    path = folder / f"{label}.safetensors"
    save_dit(tiny_dit(0, **config), path)
    plain = native.load_native_dit(path, {"dtype": torch.float32}, patch=False)
    patched = native.install_refalign(plain)
    g = torch.Generator().manual_seed(0)
    b, c, f, h, w = latent_shape
    x, refs = torch.randn(latent_shape, generator=g), torch.randn(b, c, 2, h, w, generator=g)
    t, context = torch.tensor([700.0]), torch.randn(1, text_tokens, config["text_dim"], generator=g)
    timings = {"patched": [], "unpatched": []}
    for model in (patched, plain):  # warm-up
        run_diffusion_model(model, x, t, context, refs)
    for _ in range(runs):
        for name, model in (("patched", patched), ("unpatched", plain)):
            start = time.perf_counter()
            run_diffusion_model(model, x, t, context, refs)
            timings[name].append(time.perf_counter() - start)
    ratios = [p / u for p, u in zip(timings["patched"], timings["unpatched"])]
    tokens = f * (h // 2) * (w // 2)
    print(f"{label}: {tokens} video + {2 * tokens // f} reference tokens, {text_tokens} text tokens; median s: "
          f"patched {statistics.median(timings['patched']):.3f}, unpatched {statistics.median(timings['unpatched']):.3f};"
          f" ratio median {statistics.median(ratios):.3f} (min {min(ratios):.3f}, max {max(ratios):.3f})", flush=True)
    return statistics.median(ratios)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("comfyui", help="ComfyUI folder (holding main.py)")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--layers", type=int, default=2, help="blocks of the 1.3B-shape model (of 30)")
    args = parser.parse_args()
    pack = open_comfyui(args.comfyui)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU fp32", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        medians = [measure(pack, Path(tmp), "tiny", TINY, (1, 16, 3, 12, 16), 32, args.runs * 3)]
        medians.append(measure(pack, Path(tmp), f"1.3B-shape ({args.layers} of 30 blocks)",
                          {**WAN_1_3B, "num_layers": args.layers}, (1, 16, 3, 30, 52), 512, args.runs))
    print(f"ratio: {max(medians):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
