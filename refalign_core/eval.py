"""Identity evaluation over many cases: `python -m refalign_core.eval --cases cases.json --videos DIR --out report/`.

cases.json (OpenS2V-Eval-like; a list, or a dict keyed by case id; paths relative to the case file):

    [{"id": "0001", "prompt": "...", "references": ["refs/a.png", "refs/b.png"], "names": ["alice", "dog"],
      "masks": [null, "refs/b_mask.png"], "video": "0001.mp4"}]

`references` may also be called `img_paths`; `video` defaults to the first file in --videos named `<id>.*`.
Writes `cases/<id>.json`, `sheets/<id>.png`, `summary.csv` and `summary.md` (per case and means); a case whose
video is missing or unreadable is reported with its error, and the run goes on."""

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .errors import RefAlignInputError
from .identity import IdentitySettings, check_identity
from .identity_sheet import contact_sheet
from .video_io import load_image, read_video_frames
from .vfm import load_vfm

COLUMNS = ["id", "status", "subjects", "identity_mean", "identity_min", "global_mean", "confusion_flags",
           "copy_paste", "face_similarity", "motion_amplitude", "error"]


def read_cases(path: Path) -> list[dict]:
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise RefAlignInputError(f"--cases {path}: not a readable JSON file: {e}") from e
    cases = [dict(v, id=str(k)) for k, v in raw.items()] if isinstance(raw, dict) else list(raw)
    for i, case in enumerate(cases):
        if "id" not in case or not (case.get("references") or case.get("img_paths")):
            raise RefAlignInputError(f"--cases {path}: case {i} needs an 'id' and 'references' (or 'img_paths')")
    return cases


def _video_path(case: dict, videos: Path) -> Path:
    if case.get("video"):
        return videos / case["video"]
    matches = sorted(p for p in videos.glob(f"{case['id']}.*") if p.is_file())
    if not matches:
        raise RefAlignInputError(f"no video named {case['id']}.* in {videos}")
    return matches[0]


def evaluate_case(case: dict, root: Path, videos: Path, embedder, settings, backbone: str, face_embedder, out: Path):
    refs = [load_image(root / p) for p in case.get("references") or case["img_paths"]]
    masks = [load_image(root / m).convert("L") if m else None for m in case.get("masks", [None] * len(refs))]
    video = _video_path(case, videos)
    try:
        frames = read_video_frames(video)
    except (OSError, ValueError) as e:  # PyAV raises OSError subclasses for missing / corrupt files
        raise RefAlignInputError(f"video {video} cannot be read: {e}") from e
    report = check_identity(refs, frames, embedder, masks=masks, names=case.get("names"), settings=settings,
                            backbone_name=backbone, face_embedder=face_embedder)
    (out / "cases").mkdir(parents=True, exist_ok=True)
    (out / "sheets").mkdir(parents=True, exist_ok=True)
    (out / "cases" / f"{case['id']}.json").write_text(json.dumps(
        {"id": case["id"], "prompt": case.get("prompt"), "video": str(video), **report.to_dict()}, indent=1))
    contact_sheet(report, refs, frames).save(out / "sheets" / f"{case['id']}.png")
    faces = [s.face["similarity_mean"] for s in report.subjects if s.face and s.face.get("similarity_mean") is not None]
    return {
        "id": case["id"], "status": "ok", "subjects": len(report.subjects),
        "identity_mean": report.overall, "identity_min": min(s.min for s in report.subjects),
        "global_mean": float(np.mean([s.global_mean for s in report.subjects])),
        "confusion_flags": len(report.confusion_flags), "copy_paste": len(report.copy_paste_flags),
        "face_similarity": float(np.mean(faces)) if faces else None, "motion_amplitude": report.motion_amplitude,
        "error": "",
    }


def write_summary(rows: list[dict], out: Path) -> None:
    with (out / "summary.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    ok = [r for r in rows if r["status"] == "ok"]
    numeric = ["identity_mean", "identity_min", "global_mean", "confusion_flags", "copy_paste", "face_similarity",
               "motion_amplitude"]

    def fmt(v):
        return "" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in COLUMNS) + " |" for r in rows]
    means = {c: float(np.mean([r[c] for r in ok if r[c] is not None])) if any(r[c] is not None for r in ok) else None
             for c in numeric}
    lines.append("| **mean** | " + f"{len(ok)}/{len(rows)} ok | | " + " | ".join(fmt(means[c]) for c in numeric) + " | |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m refalign_core.eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", required=True)
    parser.add_argument("--videos", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--backbone", default="efficientnet-lite0", help="efficientnet-lite0, or a DINOv2/v3 folder")
    parser.add_argument("--faces", action="store_true", help="also score faces (dlib)")
    parser.add_argument("--sample-frames", type=int, default=32)
    args = parser.parse_args(argv)
    try:
        cases_path = Path(args.cases)
        cases = read_cases(cases_path)
        embedder = load_vfm(args.backbone)
        face_embedder = None
        if args.faces:
            from .faces import FaceEmbedder
            face_embedder = FaceEmbedder()
    except RefAlignInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = IdentitySettings(sample_frames=args.sample_frames)
    rows = []
    for case in tqdm(cases, desc="evaluating", unit="case"):
        try:
            rows.append(evaluate_case(case, cases_path.parent, Path(args.videos), embedder, settings, args.backbone,
                                      face_embedder, out))
        except (RefAlignInputError, OSError) as e:
            rows.append({c: None for c in COLUMNS} | {"id": case["id"], "status": "failed", "error": str(e)})
            tqdm.write(f"case {case['id']}: {e}")
    write_summary(rows, out)
    failed = sum(r["status"] != "ok" for r in rows)
    print(f"{len(rows) - failed}/{len(rows)} cases scored; report: {out / 'summary.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
