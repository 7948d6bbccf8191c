"""Training datasets. Every format is read into `ClipEntry`s: a video (and the part of it to use), a caption, and
1–4 references, each with one or more views of its subject.

Formats (`data.datasets[].format`):

* `jsonl` — our manifest, one JSON object per line, paths relative to the manifest's folder:
  `{"video": "videos/0001.mp4", "caption": "...", "references": [{"image": "refs/a.png", "mask": "refs/a_mask.png",
  "subject": "alice"}, {"image": "refs/beach.jpg", "subject": "beach", "scene": true}]}`; optional `"frames":
  [start, end]` (the video's own frame indices). A mask is white on the subject; without one an image's alpha is
  used. Scene references are kept whole (never masked or cropped).
* `folder` — a creator's folder:

      my_dataset/
        walk_01.mp4   walk_01.txt          videos (any depth) with a same-name caption file
        walk_01.subjects.txt               optional: the subjects in this clip, one per line
        references/
          alice/  front.png  side.jpg  side_mask.png     one folder per subject, any number of photos; a photo's
          dog/    ...                                    alpha, or <photo>_mask.png (white = subject), is its mask
          scene_beach/  beach.jpg                        scene_<name>: a scene reference, kept unmasked

  A clip's subjects are those in its `.subjects.txt`, else the subjects whose folder name (underscores as spaces)
  appears in its caption as whole words (in any script and case, NFC or NFD as macOS writes names; in scripts
  written without spaces, such as Chinese and Japanese, as a run of characters), else the only subject when there is
  one. Each augmented copy of a reference uses the subject's next photo, so several photos of one subject become
  varied references.
* `opens2v` — OpenS2V-5M (its per-part JSON, keyed by clip id, with `metadata` and `annotation`): the clip's
  `face_cut` frames after its watermark `crop`, the caption `face_cap_qwen`, and per annotated subject the
  annotated frame cut to the subject's COCO-RLE mask (compressed, or uncompressed run lengths) on white; subjects
  kept as the release does (aesthetic ≥ 4.5 or GME ≥ 0.6, mask box ≥ 10 % of the frame, the 3 largest).
  `videos`: the folder holding the clips (default: the JSON's folder); `backgrounds`: optional folder of its
  inpainted backgrounds (`<clip id>.png`), added as scene references.

Paths inside a manifest or folder resolve inside it; a relative path that escapes it (`..`) is refused. Text files
(manifests, captions, subject lists) are UTF-8."""

import json
import logging
import math
import unicodedata
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import RefAlignInputError
from ..inference.video_io import load_image
from ..paths import inside
from .data import SkipCounter, file_identity, read_video_frame

logger = logging.getLogger(__name__)

VIDEO_SUFFIXES = (".mp4", ".mov", ".webm", ".mkv", ".avi", ".m4v")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
OPENS2V_MIN_AESTHETIC, OPENS2V_MIN_GME, OPENS2V_MIN_AREA = 4.5, 0.6, 0.1
# scripts written without spaces between words (Han, kana, Thai, Lao, Khmer, Myanmar): each character is a word
UNSPACED_SCRIPTS = ((0x0E00, 0x0EFF), (0x1000, 0x109F), (0x1780, 0x17FF), (0x3040, 0x30FF), (0x31F0, 0x31FF),
                    (0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF), (0x20000, 0x3134F))


def read_text(path: Path, what: str) -> str:
    """A UTF-8 text file (a leading byte-order mark dropped); other bytes are refused naming the line and column."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        line, column = data.count(b"\n", 0, e.start) + 1, e.start - data.rfind(b"\n", 0, e.start)
        raise RefAlignInputError(f"{what} {path}:{line}: byte 0x{data[e.start]:02x} at column {column} is not UTF-8 "
                                 "text; save the file as UTF-8") from e


def _whole(value, what: str) -> int:
    """A JSON whole number (7, 7.0, or ijson's Decimal); anything else is refused rather than truncated."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, (float, Decimal)) and math.isfinite(value) and value == int(value):
        return int(value)
    raise ValueError(f"{what} must be a whole number, got {value!r}")


@dataclass(frozen=True)
class ImageView:
    """A reference photo, with an optional mask file (white = subject); without one, the image's alpha."""

    image: Path
    mask: Path | None = None

    def load(self) -> tuple[Image.Image, Image.Image | None]:
        return load_image(self.image), load_image(self.mask).convert("L") if self.mask else None

    def key(self) -> str:
        """What the view's pixels depend on (file contents, not paths)."""
        return f"{file_identity(str(self.image))}:{file_identity(str(self.mask)) if self.mask else ''}"

    def __str__(self) -> str:
        return str(self.image)


@dataclass(frozen=True)
class VideoFrameView:
    """A subject cut from a frame of the clip's video: frame `index`, the clip's `crop` `(x0, y0, x1, y1)`, and
    the subject's COCO RLE mask (`{"size": [h, w], "counts": str}`, on the cropped frame)."""

    video: Path
    index: int
    rle_counts: str
    rle_size: tuple[int, int]
    crop: tuple[int, int, int, int] | None = None

    def load(self) -> tuple[Image.Image, Image.Image]:
        from pycocotools import mask as coco_mask

        frame = read_video_frame(self.video, self.index)
        if self.crop is not None:
            x0, y0, x1, y1 = self.crop
            frame = frame[max(0, y0):y1, max(0, x0):x1]
        mask = coco_mask.decode({"size": list(self.rle_size), "counts": self.rle_counts.encode()})
        if mask.shape != frame.shape[:2]:
            raise RefAlignInputError(f"{self}: mask size {mask.shape} does not match the (cropped) frame "
                                     f"{frame.shape[:2]}")
        return Image.fromarray(frame), Image.fromarray(mask.astype(np.uint8) * 255)

    def key(self) -> str:
        return f"{file_identity(str(self.video))}:{self.index}:{self.rle_counts}:{self.rle_size}:{self.crop}"

    def __str__(self) -> str:
        return f"{self.video} frame {self.index}"


@dataclass
class ReferenceEntry:
    views: list  # ImageView / VideoFrameView: augmented copy a uses views[a % len(views)]
    subject: str | None = None
    scene: bool = False  # kept whole: never masked or cropped

    def view(self, copy: int):
        return self.views[copy % len(self.views)]


@dataclass
class ClipEntry:
    video: Path
    caption: str
    references: list[ReferenceEntry]
    source: str  # where it came from, for messages ("manifest.jsonl:12")
    frame_range: tuple[int, int] | None = None  # [start, end) in the video's own frames
    crop: tuple[int, int, int, int] | None = None  # (x0, y0, x1, y1) cut out before resizing
    repeats: int = 1
    dataset: int = 0  # index in data.datasets


def _limit(references: list[ReferenceEntry], max_references: int, source: str) -> list[ReferenceEntry]:
    if len(references) > max_references:
        logger.info("%s: %d references, keeping the first %d (data.max_references)", source, len(references),
                    max_references)
    return references[:max_references]


def read_jsonl(path: Path, skipped: SkipCounter, max_references: int = 4) -> list[ClipEntry]:
    if not path.is_file():
        raise RefAlignInputError(f"dataset manifest {path} does not exist")
    entries = []
    for number, line in enumerate(read_text(path, "dataset manifest").split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            raw = json.loads(line)
            if not isinstance(raw, dict):
                raise ValueError("not a JSON object")
            refs = raw.get("references")
            if not isinstance(refs, list) or not refs:
                raise ValueError("no references")
            references = []
            for i, r in enumerate(refs):
                if not isinstance(r, dict):
                    raise ValueError(f"reference {i + 1} is not an object")
                scene = r.get("scene", False)
                if not isinstance(scene, bool):
                    raise ValueError(f"reference {i + 1} scene must be true or false, got {json.dumps(scene)}")
                mask = inside(path.parent, r["mask"], f"{where} reference {i + 1} mask") if r.get("mask") else None
                view = ImageView(inside(path.parent, r["image"], f"{where} reference {i + 1}"), mask)
                subject = r.get("subject")
                if subject is not None and not isinstance(subject, str):
                    raise ValueError(f"reference {i + 1} subject must be text, got {json.dumps(subject)}")
                references.append(ReferenceEntry([view], subject, scene))
            frames = raw.get("frames")
            if frames is not None and (not isinstance(frames, list) or len(frames) != 2):
                raise ValueError(f"frames must be [start, end], got {frames!r}")
            caption = raw.get("caption", "")
            if not isinstance(caption, str):
                raise ValueError(f"caption must be text, got {json.dumps(caption)}")
            entries.append(ClipEntry(inside(path.parent, raw["video"], f"{where} video"), caption,
                                     _limit(references, max_references, where), where,
                                     tuple(_whole(f, "frames") for f in frames) if frames else None))
        except (ValueError, KeyError, TypeError) as e:
            skipped.skip(where, e)
    return entries


def _subject_views(folder: Path) -> list[ImageView]:
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.stem.endswith("_mask"))
    views = []
    for image in images:
        masks = [p for p in folder.iterdir() if p.stem == f"{image.stem}_mask" and p.suffix.lower() in IMAGE_SUFFIXES]
        views.append(ImageView(image, masks[0] if masks else None))
    return views


def _name(text: str) -> str:
    """A subject name as written by any system: NFC (macOS writes file names in NFD)."""
    return unicodedata.normalize("NFC", text)


def _unspaced(char: str) -> bool:
    return any(low <= ord(char) <= high for low, high in UNSPACED_SCRIPTS)


def _words(text: str) -> str:
    """`text` as " word word ", for finding a name as whole words: compatibility-normalised and case-folded
    ("Zoë", "ZOË" and a decomposed "Zoë" are one word); letters, digits and combining marks make words, anything
    else separates them; in scripts written without spaces each character is a word."""
    folded = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", text).casefold())
    spaced = "".join(f" {c} " if _unspaced(c) else c if unicodedata.category(c)[0] in "LNM" else " " for c in folded)
    return " " + " ".join(spaced.split()) + " "


def read_folder(folder: Path, skipped: SkipCounter, max_references: int = 4) -> list[ClipEntry]:
    if not folder.is_dir():
        raise RefAlignInputError(f"dataset folder {folder} does not exist")
    ref_root = folder / "references"
    if not ref_root.is_dir():
        raise RefAlignInputError(f"dataset folder {folder} has no references/ folder (one subfolder per subject)")
    subjects: dict[str, ReferenceEntry] = {}
    folders: dict[str, Path] = {}
    for sub in sorted(p for p in ref_root.iterdir() if p.is_dir()):
        scene = sub.name.startswith("scene_")
        name = _name(sub.name[len("scene_"):] if scene else sub.name)
        if name in folders:
            raise RefAlignInputError(f"dataset folder {folder}: references/{folders[name].name} and "
                                     f"references/{sub.name} are both the subject {name!r}; keep one folder")
        folders[name] = sub
        views = _subject_views(sub)
        if not views:
            skipped.skip(str(sub), "no images in this subject folder")
            continue
        subjects[name] = ReferenceEntry(views, name, scene)
    if not subjects:
        raise RefAlignInputError(f"dataset folder {folder}: references/ holds no subject folder with images")
    people = [name for name, ref in subjects.items() if not ref.scene]
    keys = {name: _words(name) for name in subjects}
    entries = []
    videos = sorted(p for p in folder.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES and ref_root not in p.parents)
    for video in videos:
        caption_file, listed = video.with_suffix(".txt"), video.with_suffix(".subjects.txt")
        if not caption_file.is_file():
            skipped.skip(str(video), f"no caption file {caption_file.name}")
            continue
        try:
            caption = read_text(caption_file, "caption").strip()
            names = [_name(n.strip()) for n in read_text(listed, "subject list").split("\n") if n.strip()] \
                if listed.is_file() else None
        except RefAlignInputError as e:
            skipped.skip(str(video), e)
            continue
        if names is not None:
            unknown = [n for n in names if n not in subjects]
            if unknown:
                skipped.skip(str(video), f"{listed.name} names {unknown}, which have no folder in references/")
                continue
        else:
            words = _words(caption)
            found = [(words.find(key), n) for n, key in keys.items() if key.strip()]
            names = [n for position, n in sorted(found) if position >= 0]
            if not names and len(people) == 1:
                names = people
        if not names:
            skipped.skip(str(video), "the caption names no subject of references/ (add a .subjects.txt)")
            continue
        entries.append(ClipEntry(video, caption, _limit([subjects[n] for n in names], max_references, str(video)),
                                 str(video)))
    return entries


def _opens2v_records(path: Path):
    files = sorted(path.glob("*.json")) if path.is_dir() else [path]
    if not files or not all(f.is_file() for f in files):
        raise RefAlignInputError(f"OpenS2V dataset {path}: no JSON file there")
    for file in files:
        try:
            import ijson  # streams the multi-GB annotation files
        except ImportError:
            ijson = None
        with file.open("rb") as f:
            try:
                items = ijson.kvitems(f, "") if ijson is not None else json.load(f).items()
                for key, record in items:
                    yield file, key, record
            except (ValueError, getattr(ijson, "JSONError", ValueError)) as e:
                raise RefAlignInputError(f"OpenS2V dataset {file} is not valid JSON: {e}") from e


def _opens2v_crop(metadata: dict) -> tuple[int, int, int, int] | None:
    """OpenS2V's `crop` is [x1, x2, y1, y2] -> (x0, y0, x1, y1)."""
    crop = metadata.get("crop")
    if not crop:
        return None
    if not isinstance(crop, list) or len(crop) != 4:
        raise ValueError(f"crop must be [x1, x2, y1, y2], got {crop!r}")
    x0, x1, y0, y1 = (_whole(v, "crop") for v in crop)
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"crop [x1, x2, y1, y2] = {crop!r} is an empty box")
    return x0, y0, x1, y1


def _coco_rle(rle: dict) -> tuple[str, tuple[int, int]]:
    """A COCO RLE mask as (compressed counts text, (height, width)). Uncompressed RLE (`counts` a list of run
    lengths, column-major, starting with a run of 0s) is compressed, as pycocotools' frPyObjects does."""
    from pycocotools import mask as coco_mask

    size = rle["size"]
    if not isinstance(size, list) or len(size) != 2:
        raise ValueError(f"mask size must be [height, width], got {size!r}")
    height, width = (_whole(v, "mask size") for v in size)
    if height < 1 or width < 1:
        raise ValueError(f"mask size must be [height, width], got {size!r}")
    counts = rle["counts"]
    if isinstance(counts, list):
        runs = [_whole(c, "mask run length") for c in counts]
        if min(runs, default=0) < 0 or sum(runs) != height * width:
            raise ValueError(f"uncompressed mask counts must be run lengths ≥ 0 adding up to {height}×{width} = "
                             f"{height * width} pixels, got {len(runs)} runs adding up to {sum(runs)}")
        counts = coco_mask.frPyObjects({"size": [height, width], "counts": runs}, height, width)["counts"].decode()
    elif not isinstance(counts, str):
        raise ValueError(f"mask counts must be COCO RLE text or a list of run lengths, got {type(counts).__name__}")
    return counts, (height, width)


def _opens2v_subjects(video: Path, record: dict, crop, max_references: int) -> list[ReferenceEntry]:
    from pycocotools import mask as coco_mask

    annotation = record["annotation"]
    frame_data = annotation["ann_frame_data"]
    index = int(frame_data["ann_frame_idx"])
    scores = frame_data.get("annotations") or []
    names = annotation.get("mask_map") or {}
    kept = []
    for key, rle in (annotation.get("mask_annotation") or {}).get(str(index), {}).items():
        score = scores[int(key) - 1] if 0 < int(key) <= len(scores) else {}
        if not (float(score.get("aes_score", 0)) >= OPENS2V_MIN_AESTHETIC
                or float(score.get("gme_score", 0)) >= OPENS2V_MIN_GME):
            continue
        counts, (height, width) = _coco_rle(rle)
        _, _, box_w, box_h = coco_mask.toBbox({"size": [height, width], "counts": counts.encode()})
        area = float(box_w * box_h) / (height * width)
        if area >= OPENS2V_MIN_AREA:
            view = VideoFrameView(video, index, counts, (height, width), crop)
            kept.append((area, ReferenceEntry([view], (names.get(key) or {}).get("class_name", f"subject {key}"))))
    kept.sort(key=lambda item: -item[0])
    return [ref for _, ref in kept[:max_references]]


def read_opens2v(path: Path, videos: Path | None, backgrounds: Path | None, skipped: SkipCounter,
                 max_references: int = 3) -> list[ClipEntry]:
    entries = []
    for file, key, record in _opens2v_records(path):
        where = f"{file.name}:{key}"
        try:
            metadata = record["metadata"]
            video = inside(videos or file.parent, metadata["path"], f"{where} video")
            caption = metadata.get("face_cap_qwen") or metadata.get("cap") or ""
            caption = caption[0] if isinstance(caption, list) and caption else caption
            if not isinstance(caption, str):
                raise ValueError(f"caption must be text, got {json.dumps(caption, default=str)}")
            frame_range = metadata.get("face_cut") or metadata.get("cut")
            if frame_range and (not isinstance(frame_range, list) or len(frame_range) != 2):
                raise ValueError(f"face_cut must be [start, end], got {frame_range!r}")
            crop = _opens2v_crop(metadata)
            references = _opens2v_subjects(video, record, crop, max_references)
            if not references:
                skipped.skip(where, f"no subject passes the release filter (aesthetic ≥ {OPENS2V_MIN_AESTHETIC} or "
                                    f"GME ≥ {OPENS2V_MIN_GME}, mask box ≥ {OPENS2V_MIN_AREA:.0%} of the frame)")
                continue
            if backgrounds is not None and (backgrounds / f"{key}.png").is_file():
                references.append(ReferenceEntry([ImageView(backgrounds / f"{key}.png")], "background", scene=True))
            entries.append(ClipEntry(video, caption, references, where,
                                     tuple(_whole(v, "face_cut") for v in frame_range) if frame_range else None,
                                     crop))
        except (ValueError, KeyError, TypeError, IndexError) as e:
            skipped.skip(where, e)
    return entries


def read_dataset(source, skipped: SkipCounter, max_references: int = 4, dataset: int = 0) -> list[ClipEntry]:
    """One `data.datasets[]` entry (a `DatasetSource`) -> its clips; unusable entries are skipped and counted."""
    path = Path(source.path)
    if source.format == "jsonl":
        entries = read_jsonl(path, skipped, max_references)
    elif source.format == "folder":
        entries = read_folder(path, skipped, max_references)
    elif source.format == "opens2v":
        entries = read_opens2v(path, Path(source.videos) if source.videos else None,
                               Path(source.backgrounds) if source.backgrounds else None, skipped, max_references)
    else:
        raise RefAlignInputError(f"dataset {path}: unknown format {source.format!r}")
    for entry in entries:
        entry.repeats, entry.dataset = source.repeats, dataset
    return entries


def read_datasets(sources, skipped: SkipCounter, max_references: int = 4) -> list[ClipEntry]:
    entries = []
    for i, source in enumerate(sources):
        entries += read_dataset(source, skipped, max_references, i)
    return entries
