"""Time to score an 81-frame 480×832 video against 3 references with the default backbone (EfficientNet-Lite0),
32 frames sampled uniformly as OpenS2V does. Goal: under 30 s on this CPU.

    python bench/identity_speed.py [--runs N] [--faces]

The last line is `seconds: <median>`."""

import argparse
import statistics
import time

import numpy as np
import torch
from PIL import Image, ImageDraw

from refalign_core.metrics.identity import check_identity
from refalign_core.models.vfm import load_vfm


def scene(frames=81, height=480, width=832):
    """Three textured subjects drifting over a noisy background, and their references."""
    rng = np.random.default_rng(0)
    subjects = []
    for k in range(3):
        image = Image.new("RGB", (160, 160), (255, 255, 255))
        draw = ImageDraw.Draw(image)
        colour = tuple(int(c) for c in rng.integers(30, 230, 3))
        draw.ellipse((10, 10, 150, 150), fill=colour)
        for _ in range(12):
            x, y = rng.integers(20, 130, 2)
            draw.rectangle((x, y, x + 12, y + 12), fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
        subjects.append(np.asarray(image))
    base = rng.integers(60, 200, (height, width, 3)).astype(np.uint8)
    video = np.repeat(base[None], frames, 0)
    for t in range(frames):
        for k, s in enumerate(subjects):
            x, y = 40 + k * 260 + t, 100 + (t * (k + 1)) % 150
            video[t, y:y + 160, x:x + 160] = s
    return [Image.fromarray(s) for s in subjects], torch.from_numpy(video).float() / 255.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--faces", action="store_true")
    args = parser.parse_args()
    start = time.perf_counter()
    vfm = load_vfm("efficientnet-lite0")
    face_embedder = None
    if args.faces:
        from refalign_core.metrics.faces import FaceEmbedder
        face_embedder = FaceEmbedder()
    print(f"backbone load: {time.perf_counter() - start:.2f} s")
    references, video = scene()
    print(f"video {tuple(video.shape)}, {len(references)} references, {torch.get_num_threads()} threads")
    times = []
    for run in range(args.runs):
        start = time.perf_counter()
        report = check_identity(references, video, vfm, face_embedder=face_embedder)
        times.append(time.perf_counter() - start)
        print(f"run {run + 1}: {times[-1]:.2f} s, overall {report.overall:.3f}, {len(report.frame_indices)} frames")
    print(f"seconds: {statistics.median(times):.2f}")


if __name__ == "__main__":
    main()
