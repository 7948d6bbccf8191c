"""Dataset check before training (`python -m refalign_core prepare`): read every configured dataset the way the
feature cache will, and report what would be trained on — counts, every skipped entry with its reason, the
resolution / length / bucket histograms, and a contact sheet of the references as the model will see them."""

import argparse
import json
import logging
from collections import Counter
from pathlib import Path

from PIL import Image, ImageDraw

from ..errors import RefAlignInputError, run_command
from ..paths import check_output_folder
from .cache import clip_bucket, reference_images
from .config import load_training_config
from .data import SkipCounter, probe_video, read_video_frame
from .datasets import read_datasets

logger = logging.getLogger(__name__)
THUMB = 96


def _thumbnail(image: Image.Image, size: int = THUMB) -> Image.Image:
    image = image.convert("RGB")
    image.thumbnail((size, size))
    canvas = Image.new("RGB", (size, size), "white")
    canvas.paste(image, ((size - image.width) // 2, (size - image.height) // 2))
    return canvas


def check_clip(entry, settings) -> tuple[dict, list[Image.Image]]:
    """Probe the video, pick its bucket and load every reference view the cache's augmented copies use; raises on
    what caching would skip (`cache.clip_bucket`, `cache.reference_images`). Returns (facts, [frame thumbnail,
    reference thumbnails...])."""
    info = probe_video(entry.video)
    bucket, size = clip_bucket(entry, info, settings.fps, settings.buckets.sizes, settings.buckets.frames)
    w, h, _ = bucket
    thumbs = [_thumbnail(Image.fromarray(read_video_frame(entry.video, (entry.frame_range or (0,))[0])))]
    copies = min(settings.augment_copies, max(len(r.views) for r in entry.references)) if entry.references else 0
    for copy in range(copies):  # copy a uses view a mod n of each reference: every view is loaded once
        fitted = reference_images(entry, w, h, copy)
        if copy == 0:
            thumbs += [_thumbnail(Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype("uint8")))
                       for image in fitted]
    facts = {"video": str(entry.video), "resolution": f"{size['width']}x{size['height']}", "fps": round(info.fps, 3),
             "frames_at_fps": size["available"], "bucket": list(bucket), "references": len(entry.references),
             "subjects": [r.subject for r in entry.references]}
    return facts, thumbs


def contact_sheet(rows: list[tuple[str, list[Image.Image]]], path: Path) -> None:
    columns = 1 + max(len(thumbs) - 1 for _, thumbs in rows)
    label = 14
    sheet = Image.new("RGB", (columns * (THUMB + 4) + 4, len(rows) * (THUMB + label + 4) + 4), "#dddddd")
    draw = ImageDraw.Draw(sheet)
    for r, (caption, thumbs) in enumerate(rows):
        y = 4 + r * (THUMB + label + 4)
        draw.text((4, y), caption[:columns * 16], fill="black")
        for c, thumb in enumerate(thumbs):
            sheet.paste(thumb, (4 + c * (THUMB + 4), y + label))
    sheet.save(path)


def dataset_report(config, out: Path, sheet_rows: int = 48) -> dict:
    """Check every clip of `config.data.datasets`; write report.json, report.md and contact_sheet.png into `out`."""
    if not config.data.datasets:
        raise RefAlignInputError("prepare: the config names no dataset (data.datasets)")
    out.mkdir(parents=True, exist_ok=True)
    skipped = SkipCounter()
    entries = read_datasets(config.data.datasets, skipped, config.data.max_references)
    read = len(entries) + skipped.total
    usable, rows = [], []
    for entry in entries:
        try:
            facts, thumbs = check_clip(entry, config.data)
        except (OSError, ValueError, RuntimeError) as e:
            skipped.skip(entry.source, e, log=False)
            continue
        usable.append(facts)
        if len(rows) < sheet_rows:
            rows.append((f"{Path(entry.video).name}: {', '.join(map(str, facts['subjects']))}", thumbs))
    histograms = {
        "resolution": Counter(f["resolution"] for f in usable).most_common(),
        "frames_at_fps": sorted(Counter(min(f["frames_at_fps"] // 16 * 16, 256) for f in usable).items()),
        "bucket": Counter("x".join(map(str, f["bucket"])) for f in usable).most_common(),
        "references_per_clip": sorted(Counter(f["references"] for f in usable).items()),
    }
    report = {"entries": read, "usable": len(usable), "skipped": skipped.total, "skipped_by_kind": skipped.reasons,
              "skipped_entries": [{"entry": what, "reason": why} for what, why in skipped.entries],
              "histograms": histograms, "clips": usable}
    (out / "report.json").write_text(json.dumps(report, indent=1))
    lines = ["# Dataset report", "", f"{read} entries: **{len(usable)} usable**, {skipped.total} skipped.", ""]
    for name, values in histograms.items():
        lines += [f"## {name.replace('_', ' ')}", "", "| value | clips |", "|---|---|"]
        lines += [f"| {value if name != 'frames_at_fps' else f'{value}–{value + 15}'} | {count} |"
                  for value, count in values] + [""]
    if skipped.entries:
        lines += ["## skipped", "", "| entry | reason |", "|---|---|"]
        lines += [f"| {what} | {why} |" for what, why in skipped.entries] + [""]
    (out / "report.md").write_text("\n".join(lines))
    if rows:
        contact_sheet(rows, out / "contact_sheet.png")
    return report


def _run(argv) -> int:
    parser = argparse.ArgumentParser(prog="python -m refalign_core prepare", description=__doc__)
    parser.add_argument("--config", help="a training config: its data.datasets, buckets and fps are checked")
    parser.add_argument("--dataset", help="or one dataset: a manifest .jsonl, a creator's folder or an OpenS2V JSON")
    parser.add_argument("--format", choices=("jsonl", "folder", "opens2v"), help="default: jsonl for a file, "
                        "folder for a folder")
    parser.add_argument("--videos", help="opens2v: the folder holding the clips")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config setting, e.g. data.buckets.frames=[33,81]")
    parser.add_argument("--out", required=True, help="folder for report.json, report.md, contact_sheet.png")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    overrides = list(args.set)
    if args.dataset:
        fmt = args.format or ("folder" if Path(args.dataset).is_dir() else "jsonl")
        source = {"path": args.dataset, "format": fmt} | ({"videos": args.videos} if args.videos else {})
        overrides.append(f"data.datasets={json.dumps([source])}")
    elif not args.config:
        raise RefAlignInputError("prepare: give --config or --dataset")
    config = load_training_config(args.config, overrides)
    check_output_folder(Path(args.out), "--out")
    report = dataset_report(config, Path(args.out))
    print(f"{report['entries']} entries: {report['usable']} usable, {report['skipped']} skipped "
          f"({report['skipped_by_kind']}); report in {args.out}")
    return 0 if report["usable"] else 1


def main(argv=None) -> int:
    return run_command(_run, argv)
