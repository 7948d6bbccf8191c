"""Fault injection on the training inputs (manifests, creator folders, OpenS2V records, the YAML config, the
sample-prompts file): a bad file is one clear error naming it (and the line), a bad clip is skipped with its reason,
and nothing is silently misread."""

import json
import unicodedata
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from refalign_core.errors import RefAlignInputError
from refalign_core.models.text_encoder import TextEncoder
from tiny_models import char_tokenizer, tiny_text_encoder
from refalign_core.training.cache import CacheSettings, build_cache, write_index
from refalign_core.training.config import load_training_config
from refalign_core.training.data import SkipCounter
from refalign_core.training.datasets import read_folder, read_jsonl, read_opens2v
from refalign_core.training.previews import read_sample_prompts
from refalign_core.training.report import dataset_report
from refalign_core.inference.video_io import write_video


def write_clip(path: Path, width=96, height=64, frames=9) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_video(torch.full((frames, height, width, 3), 0.5), path, fps=16, crf=0)
    return path


def write_photo(path: Path, colour=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32), colour).save(path)
    return path


def reasons(skipped: SkipCounter) -> dict[str, str]:
    return {Path(what).name: why for what, why in skipped.entries}


# 1. captions and other manifest fields of the wrong type

def test_a_manifest_field_of_the_wrong_type_skips_its_line_with_the_reason(tmp_path):
    write_photo(tmp_path / "a.png")
    good = {"video": "v.mp4", "caption": "a red square", "references": [{"image": "a.png", "subject": "square"}]}
    bad = [{"caption": None}, {"caption": 5}, {"caption": ["a", "b"]},
           {"references": [{"image": "a.png", "scene": "false"}]},
           {"references": [{"image": "a.png", "subject": 7}]}, {"frames": [0, 8.5]}]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(good | b) for b in [{}] + bad) + "\n")
    skipped = SkipCounter()
    entries = read_jsonl(tmp_path / "m.jsonl", skipped)
    assert [e.caption for e in entries] == ["a red square"]
    why = dict(skipped.entries)
    assert "caption must be text, got null" in why[f"{tmp_path / 'm.jsonl'}:2"]
    assert "caption must be text, got 5" in why[f"{tmp_path / 'm.jsonl'}:3"]
    assert "caption must be text" in why[f"{tmp_path / 'm.jsonl'}:4"]
    assert "scene must be true or false" in why[f"{tmp_path / 'm.jsonl'}:5"]
    assert "subject must be text" in why[f"{tmp_path / 'm.jsonl'}:6"]
    assert "whole number" in why[f"{tmp_path / 'm.jsonl'}:7"]
    no_caption = good.copy()
    del no_caption["caption"]
    (tmp_path / "n.jsonl").write_text(json.dumps(no_caption) + "\n")
    assert read_jsonl(tmp_path / "n.jsonl", SkipCounter())[0].caption == ""  # absent: the empty prompt, as before


def test_an_opens2v_caption_that_is_not_text_skips_the_clip(tmp_path):
    from pycocotools import mask as coco_mask

    full = coco_mask.encode(np.ones((64, 80, 1), np.uint8, order="F"))[0]["counts"].decode()
    record = opens2v_record(full)
    record["metadata"]["face_cap_qwen"] = {"text": "a square"}
    (tmp_path / "part.json").write_text(json.dumps({"clip_1": record}))
    skipped = SkipCounter()
    assert read_opens2v(tmp_path / "part.json", tmp_path, None, skipped) == []
    assert "caption must be text" in skipped.entries[0][1]


# 2. a key given twice in the YAML config

@pytest.mark.parametrize("text, key, lines", [
    ("train:\n  lr: 1.0e-4\nseed: 3\ntrain:\n  max_steps: 5\n", "'train'", "on lines 1 and 4"),
    ("data:\n  fps: 16.0\n  buckets:\n    frames: [5]\n    frames: [9]\n", "'frames'", "on lines 4 and 5"),
    ("train: {lr: 1.0e-4, lr: 2.0e-4}\n", "'lr'", "on line 1)"),
], ids=["top level", "nested", "flow"])
def test_a_key_given_twice_in_the_config_is_refused_naming_the_key_and_the_file(tmp_path, text, key, lines):
    (tmp_path / "run.yaml").write_text(text)
    with pytest.raises(RefAlignInputError) as raised:
        load_training_config(tmp_path / "run.yaml")
    message = str(raised.value)
    assert "run.yaml" in message and key in message and lines in message and "twice" in message


def test_a_key_given_twice_in_a_set_override_is_refused_and_merges_may_still_override(tmp_path):
    with pytest.raises(RefAlignInputError, match=r"--set data.buckets=.*'frames' is given twice"):
        load_training_config(None, ["data.buckets={frames: [5], frames: [9]}"])
    text = "data:\n  buckets:\n    <<: {frames: [5], sizes: [[64, 48]]}\n    frames: [9]\n"
    (tmp_path / "override.yaml").write_text(text)
    buckets = load_training_config(tmp_path / "override.yaml").data.buckets
    assert buckets.frames == [9] and buckets.sizes == [[64, 48]]  # a merged key may be overridden


# 3. creator folders with subjects named in any script

def creator_folder(root: Path, subjects: list[str], clips: dict[str, str],
                   listed: dict[str, str] | None = None) -> Path:
    for name in subjects:
        write_photo(root / "references" / name / "photo.png")
    for clip, caption in clips.items():
        (root / "clips" / f"{clip}.mp4").parent.mkdir(parents=True, exist_ok=True)
        (root / "clips" / f"{clip}.mp4").write_bytes(b"")  # read_folder pairs files; it opens no video
        (root / "clips" / f"{clip}.txt").write_text(caption, encoding="utf-8")
    for clip, names in (listed or {}).items():
        (root / "clips" / f"{clip}.subjects.txt").write_text(names, encoding="utf-8")
    return root


def nfd(text: str) -> str:
    return unicodedata.normalize("NFD", text)


def test_subjects_with_non_ascii_names_bind_only_to_their_own_clips(tmp_path):
    folder = creator_folder(tmp_path / "ds", ["José", nfd("Zoë"), "東京", "Ünal", "Bob_Smith"], {
        "jose": "José dances on the roof",
        "zoe": "ZOË sings",  # upper case, NFC caption; the folder is NFD, as macOS writes it
        "zoe_nfd": nfd("zoë hums"),
        "tokyo": "東京の夜を歩く",
        "both": "Ünal and José talk",
        "bob": "Bob Smith waves",
        "unaccented": "Jose waits",  # another name: no subject
        "fragment": "a nal walks",  # "nal" is not "Ünal"
        "listed": "two friends",
    }, listed={"listed": "Zoë\n東京\n"})  # NFC names for an NFD folder
    skipped = SkipCounter()
    bound = {e.video.stem: [r.subject for r in e.references] for e in read_folder(folder, skipped)}
    assert bound == {"jose": ["José"], "zoe": ["Zoë"], "zoe_nfd": ["Zoë"], "tokyo": ["東京"],
                     "both": ["Ünal", "José"], "bob": ["Bob_Smith"], "listed": ["Zoë", "東京"]}
    assert set(reasons(skipped)) == {"unaccented.mp4", "fragment.mp4"}


def test_one_name_in_two_unicode_spellings_is_refused(tmp_path):
    folder = creator_folder(tmp_path / "ds", ["Zoë", nfd("Zoë")], {"zoe": "Zoë sings"})
    with pytest.raises(RefAlignInputError, match="both the subject 'Zoë'"):
        read_folder(folder, SkipCounter())


# 4. prepare (the dataset report) and the feature cache agree on which clips are usable

class TinyVFM(torch.nn.Module):
    def forward(self, images):
        return torch.nn.functional.avg_pool2d(images, 16).flatten(2).transpose(1, 2)


def test_prepare_skips_what_the_feature_cache_skips(tmp_path, vae):
    folder = tmp_path / "ds"
    write_clip(folder / "good.mp4")
    (folder / "good.txt").write_text("bob waves")
    write_clip(folder / "broken_photo.mp4")
    (folder / "broken_photo.txt").write_text("alice waves")
    write_photo(folder / "references" / "bob" / "photo.png")
    write_photo(folder / "references" / "alice" / "front.png")
    (folder / "references" / "alice" / "side.png").write_text("not an image")  # used by the second copy
    write_clip(tmp_path / "opens2v" / "clip.mp4")
    below = opens2v_record([0, 36 * 80], size=(36, 80), crop=(8, 88, 64, 100))  # rows 64–100 of a 64-row clip
    (tmp_path / "opens2v" / "part.json").write_text(json.dumps({"below": below}))
    datasets = [{"path": str(folder), "format": "folder"},
                {"path": str(tmp_path / "opens2v" / "part.json"), "format": "opens2v"}]
    config = load_training_config(None, [
        f"data.datasets={json.dumps(datasets)}", "data.buckets.sizes=[[64, 48]]", "data.buckets.frames=[5]",
        "data.fps=null", "data.augment_copies=2"])
    report = dataset_report(config, tmp_path / "report")
    prepared = {Path(c["video"]).name for c in report["clips"]}
    entries = read_folder(folder, SkipCounter()) + read_opens2v(tmp_path / "opens2v" / "part.json", None, None,
                                                                SkipCounter())
    encoders = SimpleNamespace(vae=vae, text_encoder=TextEncoder(char_tokenizer(), tiny_text_encoder()),
                               vfm=TinyVFM())
    build_cache(entries, tmp_path / "cache", CacheSettings(((64, 48),), (5,), None, augment_copies=2), encoders,
                progress=False)
    sources = {s["source"] for s in write_index(entries, tmp_path / "cache")["samples"]}
    assert sources == {str(folder / "good.mp4")}  # the cache's verdict
    assert prepared == {e.video.name for e in entries if e.source in sources}


# 5. text that is not UTF-8, and OpenS2V masks in uncompressed RLE

def test_text_files_that_are_not_utf8_name_the_file_and_line(tmp_path):
    write_photo(tmp_path / "a.png")
    line = json.dumps({"video": "v.mp4", "caption": "Zoë", "references": [{"image": "a.png"}]}, ensure_ascii=False)
    (tmp_path / "m.jsonl").write_bytes((line + "\n" + line + "\n").encode("utf-8") + line.encode("latin-1"))
    column = line.index("ë") + 1
    with pytest.raises(RefAlignInputError, match=rf"dataset manifest .*m\.jsonl:3: byte 0xeb at column {column} is "
                                                 "not UTF-8"):
        read_jsonl(tmp_path / "m.jsonl", SkipCounter())
    (tmp_path / "p.txt").write_bytes(b"# previews\na disc \xe9 --ref a.png\n")
    with pytest.raises(RefAlignInputError, match=r"previews.prompts .*p\.txt:2: byte 0xe9 at column 8"):
        read_sample_prompts(tmp_path / "p.txt", 5.0)
    folder = creator_folder(tmp_path / "ds", ["alice"], {"good": "alice waves", "latin1": "alice"})
    (folder / "clips" / "latin1.txt").write_bytes("alice dans le café".encode("latin-1"))
    skipped = SkipCounter()
    assert [e.video.stem for e in read_folder(folder, skipped)] == ["good"]
    assert "caption" in reasons(skipped)["latin1.mp4"] and "latin1.txt:1" in reasons(skipped)["latin1.mp4"]


def test_manifest_lines_are_split_at_newlines_only_and_a_bom_is_dropped(tmp_path):
    write_photo(tmp_path / "a.png")
    caption = "line\u2028separator and next\x85line"  # valid inside a JSON string; str.splitlines() cuts there
    line = json.dumps({"video": "v.mp4", "caption": caption, "references": [{"image": "a.png"}]}, ensure_ascii=False)
    (tmp_path / "m.jsonl").write_bytes(b"\xef\xbb\xbf" + (line + "\r\n" + line + "\n").encode("utf-8"))
    skipped = SkipCounter()
    assert [e.caption for e in read_jsonl(tmp_path / "m.jsonl", skipped)] == [caption, caption]
    assert skipped.total == 0


def opens2v_record(counts, size=(64, 80), crop=(8, 88, 0, 64)):
    """An OpenS2V record with one subject whose mask is `counts` (COCO RLE, compressed text or run lengths)."""
    return {"metadata": {"path": "clip.mp4", "face_cut": [0, 9], "crop": list(crop), "face_cap_qwen": "a square"},
            "annotation": {"ann_frame_data": {"ann_frame_idx": 2, "annotations": [{"aes_score": 5.0}]},
                           "mask_map": {"1": {"class_name": "square"}},
                           "mask_annotation": {"2": {"1": {"size": list(size), "counts": counts}}}}}


def column_major_runs(mask: np.ndarray) -> list[int]:
    """COCO's uncompressed RLE of a 0/1 mask: run lengths down the columns, starting with a run of 0s."""
    flat = mask.flatten(order="F")
    runs, value, length = [], 0, 0
    for pixel in flat:
        if pixel != value:
            runs.append(length)
            value, length = pixel, 0
        length += 1
    return runs + [length]


def test_opens2v_uncompressed_rle_masks_are_decoded_column_major(tmp_path):
    write_clip(tmp_path / "clip.mp4")
    mask = np.zeros((64, 80), np.uint8)
    mask[10:50, 5:20] = 1  # an L: tall bar and a foot to the right, so a transposed decode cannot match
    mask[40:50, 20:60] = 1
    runs = column_major_runs(mask)
    records = {"list": opens2v_record(runs), "wrong_total": opens2v_record(runs[:-1]),
               "negative": opens2v_record([-1, 64 * 80 + 1]),
               "reversed_crop": opens2v_record(runs, crop=(88, 8, 0, 64)),
               "float_run": opens2v_record([0.5] + runs[1:])}
    (tmp_path / "part.json").write_text(json.dumps(records))
    skipped = SkipCounter()
    entries = read_opens2v(tmp_path / "part.json", tmp_path, None, skipped)
    assert [e.source for e in entries] == ["part.json:list"]
    image, decoded = entries[0].references[0].views[0].load()
    assert image.size == (80, 64) and np.array_equal(np.asarray(decoded) > 0, mask > 0)
    why = {what.split(":")[1]: reason for what, reason in skipped.entries}
    assert "adding up to 64×80" in why["wrong_total"] and "adding up to 64×80" in why["negative"]
    assert "empty box" in why["reversed_crop"] and "whole number" in why["float_run"]
