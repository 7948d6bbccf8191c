"""The identity report as a picture: references, sampled frames with each subject's best region, per-subject heat
maps of token similarity, and the scores / flags. `evaluate` gives the report and its picture in one call."""

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ..inference.references import fit_on_white
from ..inference.video_io import to_uint8_frames
from .identity import IdentityReport, check_identity

COLOURS = [(230, 60, 60), (60, 120, 240), (40, 180, 90), (240, 180, 30), (170, 80, 200), (30, 190, 200)]
THUMB = 150


def _thumb(frame: np.ndarray, height: int = THUMB) -> Image.Image:
    image = Image.fromarray(frame)
    return image.resize((max(1, round(image.width * height / image.height)), height), Image.BILINEAR)


def _heat(values: np.ndarray, size: tuple[int, int]) -> Image.Image:
    """Similarity map -> blue (low) ... red (high), min-max over the map."""
    v = (values - values.min()) / max(1e-6, values.max() - values.min())
    rgb = np.stack([v, 1 - np.abs(2 * v - 1), 1 - v], -1)
    return Image.fromarray((rgb * 255).astype(np.uint8)).resize(size, Image.NEAREST)


def contact_sheet(report: IdentityReport, references, frames: torch.Tensor, columns: int = 6) -> Image.Image:
    """references as given to `check_identity`; frames `[T, H, W, 3]` in [0, 1] -> RGB PIL image."""
    font = ImageFont.load_default()
    k = len(report.subjects)
    picks = np.linspace(0, len(report.frame_indices) - 1, min(columns, len(report.frame_indices))).round().astype(int)
    frames_u8 = to_uint8_frames(frames)
    height, width = report.frame_size
    thumb_w = round(width * THUMB / height)
    text_lines = report.summary().splitlines()
    sheet_w = max(len(picks) * (thumb_w + 6) + 6, k * (THUMB + 6) + 6, 520)
    sheet_h = 20 + THUMB + 20 + (THUMB + 26) * (1 + k) + 14 * len(text_lines) + 10
    sheet = Image.new("RGB", (sheet_w, sheet_h), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    draw.text((6, 4), "references", fill=(0, 0, 0), font=font)
    for i, (subject, ref) in enumerate(zip(report.subjects, references)):
        fitted = to_uint8_frames(fit_on_white(ref, THUMB, THUMB).permute(1, 2, 0))
        x = 6 + i * (THUMB + 6)
        sheet.paste(Image.fromarray(fitted), (x, 20))
        draw.rectangle((x, 20, x + THUMB - 1, 20 + THUMB - 1), outline=COLOURS[i % len(COLOURS)], width=3)
        draw.text((x, 22 + THUMB), f"{subject.name}: {subject.mean:.3f}", fill=COLOURS[i % len(COLOURS)], font=font)
    y = 40 + THUMB
    draw.text((6, y - 4), "frames (best region per subject)", fill=(0, 0, 0), font=font)
    scale = THUMB / height
    for col, n in enumerate(picks):
        x = 6 + col * (thumb_w + 6)
        sheet.paste(_thumb(frames_u8[report.frame_indices[n]]), (x, y + 10))
        for i, subject in enumerate(report.subjects):
            x0, y0, x1, y1 = (np.array(subject.boxes[n]) * scale).tolist()
            draw.rectangle((x + x0, y + 10 + y0, x + x1, y + 10 + y1), outline=COLOURS[i % len(COLOURS)], width=2)
            draw.text((x + x0 + 2, y + 10 + y0 + 1), f"{subject.per_frame[n]:.2f}", fill=COLOURS[i % len(COLOURS)],
                      font=font)
        draw.text((x, y + 12 + THUMB), f"frame {report.frame_indices[n]}", fill=(0, 0, 0), font=font)
    for i, subject in enumerate(report.subjects):
        y += THUMB + 26
        draw.text((6, y - 4), f"heat map: {subject.name}", fill=COLOURS[i % len(COLOURS)], font=font)
        for col, n in enumerate(picks):
            x = 6 + col * (thumb_w + 6)
            frame = _thumb(frames_u8[report.frame_indices[n]])
            if report.heatmaps is not None:
                frame = Image.blend(frame, _heat(report.heatmaps[i, n], frame.size), 0.55)
            sheet.paste(frame, (x, y + 10))
    y += THUMB + 34
    for line in text_lines:
        draw.text((6, y), line, fill=(180, 0, 0) if "!" in line or "COPY" in line else (0, 0, 0), font=font)
        y += 14
    return sheet


def evaluate(references, frames: torch.Tensor, embedder, **options) -> tuple[IdentityReport, Image.Image]:
    """`check_identity(references, frames, embedder, **options)` and its contact sheet: (report, sheet).
    references: images (the sheet shows them as given; masks go in `options`)."""
    report = check_identity(references, frames, embedder, **options)
    return report, contact_sheet(report, references, frames)
