"""Identity evaluation over many cases: `python -m refalign_core eval --cases cases.json --videos DIR --out
report/`.

cases.json (OpenS2V-Eval-like; a list, or a dict keyed by case id; paths relative to the case file):

    [{"id": "0001", "prompt": "...", "references": ["refs/a.png", "refs/b.png"], "names": ["alice", "dog"],
      "masks": [null, "refs/b_mask.png"], "video": "0001.mp4"}]

`references` may also be called `img_paths`; `video` defaults to the first file in --videos named exactly
`<id>.<suffix>`. Writes `cases/<id>.json`, `sheets/<id>.png`, `summary.csv` and `summary.md` (per case and means),
each whole or not at all; a case that cannot be scored (a missing or unreadable video or image) is reported with its
error, and the run goes on. A report that cannot be written fails that case too, and the run exits 1 at the end."""

import argparse
import csv
import io
import json
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..errors import RefAlignInputError, run_command
from ..files import write_atomic
from ..inference.references import MAX_REFERENCES
from ..inference.video_io import load_image, read_video_frames
from ..models.vfm import load_vfm
from ..paths import check_output_folder, inside
from .identity import IdentitySettings
from .identity_sheet import evaluate

COLUMNS = ["id", "status", "subjects", "identity_mean", "identity_min", "global_mean", "confusion_flags",
           "copy_paste", "face_similarity", "motion_amplitude", "error"]


def _strings(value, what: str, allow_none: bool = False) -> list:
    if not isinstance(value, list) or not all(isinstance(v, str) or (allow_none and v is None) for v in value):
        kind = "paths or null" if allow_none else "strings"
        raise RefAlignInputError(f"{what}: expected a list of {kind}, got {value!r}")
    return value


def read_cases(path: Path) -> list[dict]:
    """The cases, checked: each an object with a unique, file-name-safe id and 1–4 reference paths (inside the case
    file's folder unless absolute); `names` / `masks`, when given, one per reference."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise RefAlignInputError(f"--cases {path}: not a readable JSON file: {e}") from e
    if not isinstance(raw, (dict, list)):
        raise RefAlignInputError(f"--cases {path}: expected a list of cases or an object of cases by id")
    items = [(k, v) for k, v in raw.items()] if isinstance(raw, dict) else [(None, v) for v in raw]
    cases, seen = [], set()
    for i, (key, value) in enumerate(items):
        where = f"--cases {path}: case {key if key is not None else i}"
        if not isinstance(value, dict):
            raise RefAlignInputError(f"{where}: expected an object, got {value!r}")
        case = dict(value, id=key) if key is not None else dict(value)
        case_id = case.get("id")
        if not isinstance(case_id, (str, int)) or isinstance(case_id, bool) or str(case_id) in ("", ".", "..") \
                or any(c in str(case_id) for c in "/\\\0"):
            raise RefAlignInputError(f"{where}: 'id' must be a file-name-safe string (no '/', '..'), got {case_id!r}")
        case["id"] = str(case_id)
        if case["id"] in seen:
            raise RefAlignInputError(f"{where}: the id {case['id']!r} is used twice (its report would overwrite "
                                     "the other's)")
        seen.add(case["id"])
        references = _strings(case.get("references") or case.get("img_paths"), f"{where} references")
        if not 1 <= len(references) <= MAX_REFERENCES:
            raise RefAlignInputError(f"{where}: needs 1–{MAX_REFERENCES} references, got {len(references)}")
        case["references"] = [inside(path.parent, r, f"{where} reference") for r in references]
        for key_name, allow_none in (("names", False), ("masks", True)):
            if case.get(key_name) is not None and len(_strings(case[key_name], f"{where} {key_name}",
                                                                 allow_none)) != len(references):
                raise RefAlignInputError(f"{where}: {key_name} must have one entry per reference "
                                         f"({len(references)}), got {len(case[key_name])}")
        case["masks"] = [inside(path.parent, m, f"{where} mask") if m else None
                         for m in case.get("masks") or [None] * len(references)]
        if case.get("video") is not None and not isinstance(case["video"], str):
            raise RefAlignInputError(f"{where}: video must be a path, got {case['video']!r}")
        cases.append(case)
    if not cases:
        raise RefAlignInputError(f"--cases {path}: no cases")
    return cases


def _video_path(case: dict, videos: Path) -> Path:
    if case.get("video"):
        return inside(videos, case["video"], f"case {case['id']} video")
    matches = sorted(p for p in videos.iterdir() if p.stem == case["id"] and p.suffix and p.is_file())
    if not matches:
        raise RefAlignInputError(f"no video named {case['id']}.<suffix> in {videos}")
    return matches[0]


def evaluate_case(case: dict, videos: Path, embedder, settings, backbone: str, face_embedder, out: Path):
    refs = [load_image(p) for p in case["references"]]
    masks = [load_image(m).convert("L") if m else None for m in case["masks"]]
    video = _video_path(case, videos)
    try:
        frames = read_video_frames(video)
    except (OSError, ValueError) as e:  # PyAV raises OSError subclasses for missing / corrupt files
        raise RefAlignInputError(f"video {video} cannot be read: {e}") from e
    report, picture = evaluate(refs, frames, embedder, masks=masks, names=case.get("names"), settings=settings,
                               backbone_name=backbone, face_embedder=face_embedder)
    (out / "cases").mkdir(parents=True, exist_ok=True)
    (out / "sheets").mkdir(parents=True, exist_ok=True)
    sheet = io.BytesIO()
    picture.save(sheet, format="PNG")
    case_report = write_atomic(out / "cases" / f"{case['id']}.json", json.dumps(
        {"id": case["id"], "prompt": case.get("prompt"), "video": str(video), **report.to_dict()}, indent=1))
    try:
        write_atomic(out / "sheets" / f"{case['id']}.png", sheet.getvalue())
    except OSError:
        case_report.unlink(missing_ok=True)  # a failed case leaves no report of its own
        raise
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
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(out / "summary.csv", table.getvalue())
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
    write_atomic(out / "summary.md", "\n".join(lines) + "\n")


def _run(argv) -> int:
    parser = argparse.ArgumentParser(prog="python -m refalign_core eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", required=True)
    parser.add_argument("--videos", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--backbone", default="efficientnet-lite0", help="efficientnet-lite0, or a DINOv2/v3 folder")
    parser.add_argument("--faces", action="store_true", help="also score faces (dlib)")
    parser.add_argument("--sample-frames", type=int, default=32)
    args = parser.parse_args(argv)
    cases_path = Path(args.cases)
    cases = read_cases(cases_path)
    if not Path(args.videos).is_dir():
        raise RefAlignInputError(f"--videos {args.videos} is not a folder")
    if args.sample_frames < 1:
        raise RefAlignInputError(f"--sample-frames must be ≥ 1, got {args.sample_frames}")
    check_output_folder(Path(args.out), "--out")
    embedder = load_vfm(args.backbone)
    face_embedder = None
    if args.faces:
        from .faces import FaceEmbedder
        face_embedder = FaceEmbedder()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = IdentitySettings(sample_frames=args.sample_frames)
    rows, unwritten = [], []
    try:
        for case in tqdm(cases, desc="evaluating", unit="case"):
            try:
                rows.append(evaluate_case(case, Path(args.videos), embedder, settings, args.backbone, face_embedder,
                                          out))
            except (RefAlignInputError, OSError) as e:
                rows.append({c: None for c in COLUMNS} | {"id": case["id"], "status": "failed", "error": str(e)})
                tqdm.write(f"case {case['id']}: {e}")
                if isinstance(e, OSError):
                    unwritten.append(f"case {case['id']}: {e}")
    finally:  # whatever stops the run, the cases scored so far are summarised
        write_summary(rows, out)
    failed = sum(r["status"] != "ok" for r in rows)
    print(f"{len(rows) - failed}/{len(rows)} cases scored; report: {out / 'summary.md'}")
    if unwritten:
        raise OSError(f"{len(unwritten)} case report(s) could not be written, first {unwritten[0]}")
    return 0


def main(argv=None) -> int:
    return run_command(_run, argv)


if __name__ == "__main__":
    sys.exit(main())
