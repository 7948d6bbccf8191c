"""Cost of the reference tail: our R2V forward with K references ÷ plain diffusers `WanTransformer3DModel` on the
same F+K frames with the same weights (goal ≤ 1.00: reference tokens skip text cross-attention).

    python bench/reference_overhead.py                # tiny config
    python bench/reference_overhead.py --real-shape   # Wan2.1-1.3B shape, 9 frames at 240x416, random fp32 weights

One process, the two models interleaved run by run; the last line is `ratio: <median>`."""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from diffusers import WanTransformer3DModel

from refalign_core.models.transformer_refalign import RefAlignTransformer3DModel

CONFIGS = Path(__file__).parents[1] / "refalign_core" / "models" / "configs"
TINY = dict(num_attention_heads=4, attention_head_dim=32, text_dim=256, freq_dim=64, ffn_dim=512, num_layers=4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--real-shape", action="store_true")
    parser.add_argument("--runs", type=int, default=None)
    parser.add_argument("--references", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.real_shape:
        config = json.loads((CONFIGS / "wan2.1_t2v_1.3b.json").read_text())
        frames, height, width, text_len, runs = 9, 240, 416, 512, args.runs or 3
    else:
        config, frames, height, width, text_len, runs = TINY, 17, 128, 128, 64, args.runs or 15
    ours = RefAlignTransformer3DModel(**config).eval().requires_grad_(False)
    plain = WanTransformer3DModel(**config).eval().requires_grad_(False)
    plain.load_state_dict(ours.state_dict())
    k = args.references
    latent = torch.randn(1, 16, (frames - 1) // 4 + 1, height // 8, width // 8)
    refs = torch.randn(1, 16, k, height // 8, width // 8)
    text = torch.randn(1, text_len, config["text_dim"])
    t = torch.tensor([500.0])
    joint = torch.cat([latent, refs], dim=2)
    tokens = joint.shape[2] * (height // 16) * (width // 16)
    print(f"config {config}\nvideo latents {tuple(latent.shape)}, K={k}, {tokens} tokens, {torch.get_num_threads()} threads")

    def time_ours():
        start = time.perf_counter()
        ours(latent, t, text, reference_latents=refs)
        return time.perf_counter() - start

    def time_plain():
        start = time.perf_counter()
        plain(joint, t, text)
        return time.perf_counter() - start

    with torch.inference_mode():
        time_ours(), time_plain()  # warm-up
        ratios, ours_s, plain_s = [], [], []
        for run in range(runs):
            a, b = (time_ours(), time_plain()) if run % 2 == 0 else (time_plain(), time_ours())[::-1]
            ours_s.append(a), plain_s.append(b), ratios.append(a / b)
            print(f"run {run + 1}/{runs}: ours {a * 1000:.1f} ms, plain {b * 1000:.1f} ms, ratio {a / b:.3f}")
    print(f"median ours {statistics.median(ours_s) * 1000:.1f} ms, plain {statistics.median(plain_s) * 1000:.1f} ms")
    print(f"ratio: {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
