"""Identity check: does a generated video keep each reference subject, without copy-paste or mixing subjects?

For K references and a video, on uniformly sampled frames:
* identity: cosine between the reference's subject embedding (VFM tokens pooled over the non-white subject area)
  and the best-matching window of the frame (pooled tokens, searched over positions and sizes), plus the whole
  frame (global); per-frame curves, mean and min per subject, and a per-token heat map;
* confusion: matrix M[i][j] = similarity of reference i to the region found for subject j; flagged when a region
  matches another reference better than its own, or two subjects land on the same region;
* copy-paste: the reference's subject is template-matched (pixels, NCC) around its region; flagged when the match
  is near-identical and the region barely moves or changes over time;
* motion amplitude: Farneback optical flow between consecutive frames, |mean signed flow| (OpenS2V's definition),
  in pixels at a 224-pixel short side;
* faces (optional): dlib face embeddings, per reference face, best-matching face per frame.

Any backbone works that maps images `[B, 3, H, W]` in [0, 1] to tokens `[B, (H/16)(W/16), D]` (see `vfm.py`)."""

from dataclasses import asdict, dataclass, field

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from ..errors import RefAlignInputError
from ..inference.references import as_references, fit_on_white, to_chw
from ..inference.video_io import checked_frames, to_uint8_frames


@dataclass
class IdentitySettings:
    sample_frames: int = 32  # uniformly sampled frames (OpenS2V scores 32)
    frame_short_side: int = 224  # frames are scored at this short side (rounded to 16)
    reference_size: int = 224
    copy_paste_similarity: float = 0.9  # NCC of the reference pixels at the subject's region
    copy_paste_motion: float = 0.01  # region motion per frame (fraction of the frame diagonal, + log-scale change)
    copy_paste_change: float = 0.02  # 1 − NCC between consecutive region crops
    same_region_iou: float = 0.5
    confusion_margin: float = 0.0


@dataclass
class SubjectReport:
    index: int
    name: str
    mean: float
    min: float
    global_mean: float
    per_frame: list[float]
    global_per_frame: list[float]
    boxes: list[list[float]]  # best region per sampled frame, [x0, y0, x1, y1] in frame pixels
    copy_paste: dict
    face: dict | None = None


@dataclass
class IdentityReport:
    frame_indices: list[int]
    frame_size: list[int]  # [H, W]
    subjects: list[SubjectReport]
    confusion_matrix: list[list[float]]
    confusion_flags: list[str]
    motion_amplitude: float
    backbone: str
    heatmaps: np.ndarray | None = field(default=None, repr=False)  # [K, N, gh, gw] per-token similarity

    @property
    def overall(self) -> float:
        return float(np.mean([s.mean for s in self.subjects]))

    @property
    def copy_paste_flags(self) -> list[str]:
        return [s.name for s in self.subjects if s.copy_paste["flag"]]

    def to_dict(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k != "heatmaps"}
        out["overall"] = self.overall
        out["copy_paste_flags"] = self.copy_paste_flags
        return out

    def summary(self) -> str:
        lines = [f"identity (backbone {self.backbone}, {len(self.frame_indices)} frames): overall {self.overall:.3f}"]
        for s in self.subjects:
            line = f"  {s.name}: mean {s.mean:.3f}  min {s.min:.3f}  global {s.global_mean:.3f}"
            if s.copy_paste["flag"]:
                line += "  COPY-PASTE"
            if s.face is not None:
                line += ("  face: no face in the reference" if not s.face["reference_face"] else
                         f"  face distance {s.face['distance_mean']:.3f}, match rate {s.face['match_rate']:.2f}")
            lines.append(line)
        if len(self.subjects) > 1:
            names = [s.name for s in self.subjects]
            lines.append("  confusion (row: reference, column: region of subject):")
            for name, row in zip(names, self.confusion_matrix):
                lines.append(f"    {name:>12}: " + "  ".join(f"{v:.3f}" for v in row))
        lines += [f"  ! {flag}" for flag in self.confusion_flags]
        lines.append(f"  motion amplitude {self.motion_amplitude:.3f}")
        return "\n".join(lines)


def _round16(x: float) -> int:
    return max(16, int(round(x / 16)) * 16)


def _window_sizes(gh: int, gw: int) -> list[tuple[int, int]]:
    steps = sorted({max(1, round(v)) for v in np.geomspace(1, max(gh, gw), 10)})
    return [(h, w) for h in steps if h <= gh for w in steps if w <= gw and 1 / 3 <= w / h <= 3]


def _best_windows(tokens: torch.Tensor, refs: torch.Tensor):
    """tokens `[gh, gw, D]`, refs `[K, D]` unit -> best (score `[K]`, box `[K, 4]` in token units, pooled `[K, D]`)."""
    gh, gw, d = tokens.shape
    integral = F.pad(tokens.cumsum(0).cumsum(1), (0, 0, 1, 0, 1, 0))
    best = torch.full((refs.shape[0],), -2.0)
    boxes = torch.zeros(refs.shape[0], 4)
    pooled_best = torch.zeros(refs.shape[0], d)
    for h, w in _window_sizes(gh, gw):
        sums = integral[h:, w:] - integral[:-h, w:] - integral[h:, :-w] + integral[:-h, :-w]  # [ny, nx, D]
        pooled = F.normalize(sums, dim=-1)
        scores = torch.einsum("yxd,kd->kyx", pooled, refs)
        flat = scores.flatten(1)
        value, index = flat.max(1)
        better = value > best
        if better.any():
            nx = scores.shape[2]
            y, x = index // nx, index % nx
            best = torch.where(better, value, best)
            new_boxes = torch.stack([x, y, x + w, y + h], 1).float()
            boxes[better] = new_boxes[better]
            pooled_best[better] = pooled[y, x][better]
    return best, boxes, pooled_best


def _gray(image: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32) / 255.0


def _template_match(frame: np.ndarray, template: np.ndarray, box) -> tuple[float, list[float]]:
    """Best NCC of `template` (gray) resized around `box`'s size, searched near the box -> (score, refined box)."""
    fh, fw = frame.shape
    x0, y0, x1, y1 = box
    bw, bh = max(4.0, x1 - x0), max(4.0, y1 - y0)
    th, tw = template.shape
    best = (-1.0, list(box))
    for scale in np.geomspace(0.6, 1.8, 17):
        s = min(bw / tw, bh / th) * scale
        w, h = max(4, round(tw * s)), max(4, round(th * s))
        if w >= fw or h >= fh:
            continue
        pad_x, pad_y = int(0.6 * bw) + w // 2 + 2, int(0.6 * bh) + h // 2 + 2
        cx0, cy0 = max(0, int(x0) - pad_x), max(0, int(y0) - pad_y)
        cx1, cy1 = min(fw, int(x1) + pad_x), min(fh, int(y1) + pad_y)
        if cx1 - cx0 < w or cy1 - cy0 < h:
            continue
        patch = cv2.resize(template, (w, h), interpolation=cv2.INTER_AREA)
        if patch.std() < 1e-3:
            continue
        result = cv2.matchTemplate(frame[cy0:cy1, cx0:cx1], patch, cv2.TM_CCOEFF_NORMED)
        _, value, _, (mx, my) = cv2.minMaxLoc(result)
        if value > best[0]:
            best = (float(value), [cx0 + mx, cy0 + my, cx0 + mx + w, cy0 + my + h])
    return best


def _ncc(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    denominator = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denominator) if denominator > 1e-8 else 1.0


def _copy_paste(frames_gray: list[np.ndarray], template: np.ndarray, boxes: list[list[float]],
                settings: IdentitySettings) -> dict:
    matches = [_template_match(f, template, b) for f, b in zip(frames_gray, boxes)]
    similarity = float(np.median([m[0] for m in matches]))
    refined = [m[1] for m in matches]
    h, w = frames_gray[0].shape
    diagonal = float(np.hypot(h, w))
    motion, change = [], []
    for (a, ba), (b, bb) in zip(zip(frames_gray, refined), zip(frames_gray[1:], refined[1:])):
        ca, cb = np.array(ba), np.array(bb)
        centre = np.hypot(*((ca[:2] + ca[2:]) / 2 - (cb[:2] + cb[2:]) / 2)) / diagonal
        area = np.log(max(1.0, (ca[2] - ca[0]) * (ca[3] - ca[1])) / max(1.0, (cb[2] - cb[0]) * (cb[3] - cb[1])))
        motion.append(float(centre + abs(area)))
        crop_a = cv2.resize(a[int(ba[1]):int(ba[3]), int(ba[0]):int(ba[2])], (32, 32), interpolation=cv2.INTER_AREA)
        crop_b = cv2.resize(b[int(ba[1]):int(ba[3]), int(ba[0]):int(ba[2])], (32, 32), interpolation=cv2.INTER_AREA)
        change.append(1.0 - _ncc(crop_a, crop_b))
    motion_mean = float(np.mean(motion)) if motion else 0.0
    change_mean = float(np.mean(change)) if change else 0.0
    flag = (similarity >= settings.copy_paste_similarity and motion_mean < settings.copy_paste_motion
            and change_mean < settings.copy_paste_change)
    return {"flag": bool(flag), "pixel_similarity": similarity, "region_motion": motion_mean,
            "region_change": change_mean}


def motion_amplitude(frames_u8: np.ndarray, short_side: int = 224) -> float:
    """Mean over consecutive frames of |mean signed Farneback flow| (pixels at `short_side`)."""
    if len(frames_u8) < 2:
        return 0.0
    h, w = frames_u8.shape[1:3]
    scale = short_side / min(h, w)
    size = (max(8, round(w * scale)), max(8, round(h * scale)))
    gray = [cv2.cvtColor(cv2.resize(f, size, interpolation=cv2.INTER_AREA), cv2.COLOR_RGB2GRAY) for f in frames_u8]
    values = []
    for a, b in zip(gray, gray[1:]):
        flow = cv2.calcOpticalFlowFarneback(a, b, None, 0.5, 3, 15, 3, 5, 1.2, 0)
        values.append(float(np.hypot(*flow.reshape(-1, 2).mean(0))))
    return float(np.mean(values))


def _subject_template(reference: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
    """Fitted reference `[3, S, S]` -> (gray crop of the non-white subject, pixel mask `[S, S]`)."""
    mask = (reference < 0.94).any(0)
    if not mask.any():
        mask = torch.ones_like(mask)
    ys, xs = torch.nonzero(mask, as_tuple=True)
    crop = reference[:, ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    crop_u8 = to_uint8_frames(crop.permute(1, 2, 0))
    return _gray(crop_u8), mask


@torch.no_grad()
def _checked_inputs(references, frames, masks, names):
    """(reference images, float frames, masks, names), one entry per reference; one clear error for bad input."""
    records = as_references(references)  # `Reference`s bring their mask and name where none are given
    references = [record.image for record in records]
    if masks is None and any(record.mask is not None for record in records):
        masks = [record.mask for record in records]
    if names is None and any(record.name for record in records):
        names = [record.name or f"subject {i + 1}" for i, record in enumerate(records)]
    if not references:
        raise RefAlignInputError("identity check: at least one reference image is needed")
    frames = checked_frames(frames, "identity check")
    for what, value in (("names", names), ("masks", masks)):
        if isinstance(value, str):
            raise RefAlignInputError(f"identity check: {what} must be a list, one entry per reference, not the "
                                     f"text {value!r}")
    names = list(names) if names is not None else [f"subject {i + 1}" for i in range(len(references))]
    masks = list(masks) if masks is not None else [None] * len(references)
    if len(names) != len(references) or not all(isinstance(n, str) for n in names):
        raise RefAlignInputError(f"identity check: names must be a list of {len(references)} strings, one per "
                                 f"reference, got {names!r}")
    if len(masks) != len(references):
        raise RefAlignInputError(f"identity check: masks must be a list of {len(references)} (a mask or None per "
                                 "reference)")
    return references, frames, masks, names


def _reference_embeddings(references, masks, names, embedder, size: int):
    """Each reference fitted on white at `size`² and embedded: (copy-paste templates, `[K, D]` unit embeddings
    pooled over the subject's tokens, or over all tokens where the subject covers none)."""
    fitted = torch.stack([fit_on_white(r, size, size, m, name=n) for r, m, n in zip(references, masks, names)])
    ref_tokens = embedder(fitted).float()  # [K, (size/16)², D]
    templates, embeddings = [], []
    for k, ref in enumerate(fitted):
        template, mask = _subject_template(ref)
        templates.append(template)
        token_mask = F.avg_pool2d(mask[None, None].float(), 16).flatten() > 0.2
        if not token_mask.any():
            token_mask = torch.ones((size // 16) ** 2, dtype=torch.bool)
        embeddings.append(F.normalize(ref_tokens[k][token_mask].sum(0), dim=0))
    return templates, torch.stack(embeddings)


def _confusion_flags(matrix, pixel_boxes, names, settings: IdentitySettings) -> list[str]:
    """A region that looks more like another subject's reference than its own, and two subjects found on the same
    region in at least half of the frames."""
    flags, count = [], matrix.shape[0]
    for j in range(count):
        for i in range(count):
            if i != j and matrix[i, j] > matrix[j, j] + settings.confusion_margin:
                flags.append(f"the region of {names[j]} looks more like {names[i]}'s reference "
                             f"({matrix[i, j]:.3f} > {matrix[j, j]:.3f})")
    for i in range(count):
        for j in range(i + 1, count):
            shared = np.mean([_iou(b[i], b[j]) > settings.same_region_iou for b in pixel_boxes])
            if shared >= 0.5:
                flags.append(f"{names[i]} and {names[j]} land on the same region in {shared:.0%} of the frames")
    return flags


def check_identity(references, frames: torch.Tensor, embedder, masks=None, names=None,
                   settings: IdentitySettings | None = None, backbone_name: str = "custom",
                   face_embedder=None) -> IdentityReport:
    """references: 1..K images (any form `fit_on_white` takes) or `Reference`s; frames `[T, H, W, 3]` float in
    [0, 1] (or uint8); embedder: images -> grid tokens. Returns the per-subject report."""
    settings = settings or IdentitySettings()
    references, frames, masks, names = _checked_inputs(references, frames, masks, names)
    total, height, width = frames.shape[0], frames.shape[1], frames.shape[2]
    indices = sorted({int(round(i)) for i in np.linspace(0, total - 1, min(settings.sample_frames, total))})
    templates, refs = _reference_embeddings(references, masks, names, embedder, settings.reference_size)  # [K, D]

    scale = settings.frame_short_side / min(height, width)
    work_h, work_w = _round16(height * scale), _round16(width * scale)
    sampled = frames[indices].permute(0, 3, 1, 2).float().clamp(0, 1)
    work = F.interpolate(sampled, size=(work_h, work_w), mode="bilinear", antialias=True, align_corners=False)
    gh, gw = work_h // 16, work_w // 16
    tokens = torch.cat([embedder(work[i:i + 8]).float() for i in range(0, len(work), 8)]).view(-1, gh, gw, refs.shape[1])

    scores, global_scores, boxes, pooled = [], [], [], []
    heatmaps = torch.einsum("nyxd,kd->knyx", F.normalize(tokens, dim=-1), refs)
    for frame_tokens in tokens:
        score, box, pool = _best_windows(frame_tokens, refs)
        scores.append(score), boxes.append(box), pooled.append(pool)
        global_scores.append(F.normalize(frame_tokens.sum((0, 1)), dim=0) @ refs.T)
    scores, global_scores = torch.stack(scores), torch.stack(global_scores)  # [N, K]
    pooled = torch.stack(pooled)  # [N, K(region of j), D]
    matrix = torch.einsum("id,njd->nij", refs, pooled).mean(0)  # [K ref, K region]
    px = torch.tensor([width / gw, height / gh, width / gw, height / gh])
    pixel_boxes = (torch.stack(boxes) * px).tolist()  # [N][K][4] in original frame pixels

    frames_u8 = to_uint8_frames(frames)
    work_gray = [_gray(cv2.resize(frames_u8[i], (work_w, work_h), interpolation=cv2.INTER_AREA)) for i in indices]
    to_work = np.array([work_w / width, work_h / height, work_w / width, work_h / height])
    faces = _face_reports(references, frames_u8, indices, face_embedder) if face_embedder is not None else None
    subjects = []
    for k in range(len(references)):
        work_boxes = [list(np.array(b[k]) * to_work) for b in pixel_boxes]
        subjects.append(SubjectReport(
            index=k, name=names[k], mean=float(scores[:, k].mean()), min=float(scores[:, k].min()),
            global_mean=float(global_scores[:, k].mean()), per_frame=scores[:, k].tolist(),
            global_per_frame=global_scores[:, k].tolist(), boxes=[b[k] for b in pixel_boxes],
            copy_paste=_copy_paste(work_gray, templates[k], work_boxes, settings),
            face=faces[k] if faces is not None else None,
        ))
    return IdentityReport(
        frame_indices=indices, frame_size=[height, width], subjects=subjects, confusion_matrix=matrix.tolist(),
        confusion_flags=_confusion_flags(matrix, pixel_boxes, names, settings),
        motion_amplitude=motion_amplitude(frames_u8), backbone=backbone_name, heatmaps=heatmaps.numpy(),
    )


def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _face_reports(references, frames_u8, indices, face_embedder) -> list[dict]:
    from .faces import SAME_PERSON_DISTANCE, face_distance

    reports = []
    frame_faces = None
    for reference in references:
        rgb, _ = to_chw(reference)
        ref_face = face_embedder.largest_face(to_uint8_frames(rgb.permute(1, 2, 0)))
        if ref_face is None:
            reports.append({"reference_face": False})
            continue
        if frame_faces is None:
            frame_faces = [face_embedder.all_faces(frames_u8[i]) for i in indices]
        distances = [min((face_distance(ref_face, f) for f in faces), default=None) for faces in frame_faces]
        found = [d for d in distances if d is not None]
        reports.append({
            "reference_face": True,
            "frames_with_face": len(found),
            "distance_mean": float(np.mean(found)) if found else None,
            "similarity_mean": float(np.mean([1 - d for d in found])) if found else None,
            "match_rate": float(np.mean([d < SAME_PERSON_DISTANCE for d in found])) if found else 0.0,
            "per_frame_distance": distances,
        })
    return reports
