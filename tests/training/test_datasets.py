"""Dataset formats (our JSONL, a creator's folder, OpenS2V-5M) read end to end on tiny data made here, buckets,
and the feature cache's resume and fingerprint."""

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from refalign_core.errors import RefAlignInputError
from refalign_core.models.safetensors_io import read_safetensors, write_safetensors
from refalign_core.models.text_encoder import TextEncoder
from tiny_models import char_tokenizer, tiny_text_encoder
from refalign_core.training.buckets import BucketBatchSampler, assign_bucket
from refalign_core.training.cache import (CacheSettings, FeatureCache, build_cache, check_fingerprint, missing_entries,
                                          write_index)
from refalign_core.training.data import SkipCounter
from refalign_core.training.datasets import read_folder, read_opens2v
from refalign_core.inference.video_io import write_video


def video(path, width, height, frames=17, colour=(200, 40, 40)):
    """A square of `colour` moving right over grey, lossless."""
    clip = torch.full((frames, height, width, 3), 0.5)
    for f in range(frames):
        x = 4 + f * (width - 24) // frames
        clip[f, height // 3: height // 3 + 16, x:x + 16] = torch.tensor(colour) / 255
    write_video(clip, path, fps=16, crf=0)
    return path


def disc(size=48, colour=(30, 60, 220), alpha=True):
    """A disc on a transparent (RGBA) or black background, and its mask."""
    yy, xx = np.mgrid[:size, :size]
    inside = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 3) ** 2
    rgb = np.zeros((size, size, 3), np.uint8)
    rgb[inside] = colour
    mask = Image.fromarray((inside * 255).astype(np.uint8))
    image = Image.fromarray(rgb)
    if alpha:
        image = image.convert("RGBA")
        image.putalpha(mask)
    return image, mask


class TinyVFM(torch.nn.Module):
    dim = 3

    def forward(self, images):
        return torch.nn.functional.avg_pool2d(images, 16).flatten(2).transpose(1, 2)


@pytest.fixture(scope="module")
def encoders(vae):
    return SimpleNamespace(vae=vae, text_encoder=TextEncoder(char_tokenizer(), tiny_text_encoder()), vfm=TinyVFM())


@pytest.fixture
def creator_folder(tmp_path):
    root = tmp_path / "my_dataset"
    (root / "clips").mkdir(parents=True)
    video(root / "clips" / "walk.mp4", 96, 64)
    (root / "clips" / "walk.txt").write_text("Alice walks in the park")
    video(root / "clips" / "run.mp4", 64, 96)
    (root / "clips" / "run.txt").write_text("someone runs")
    (root / "clips" / "run.subjects.txt").write_text("bob\nalice\n")
    video(root / "clips" / "nocaption.mp4", 64, 64)
    video(root / "clips" / "nobody.mp4", 64, 64)
    (root / "clips" / "nobody.txt").write_text("an empty street")
    refs = root / "references"
    for name in ("alice", "bob", "scene_park"):
        (refs / name).mkdir(parents=True)
    disc()[0].save(refs / "alice" / "front.png")
    disc(colour=(30, 200, 30))[0].save(refs / "alice" / "side.png")
    image, mask = disc(colour=(250, 200, 30), alpha=False)
    image.save(refs / "bob" / "photo.jpg")
    mask.save(refs / "bob" / "photo_mask.png")
    Image.new("RGB", (80, 48), (20, 120, 20)).save(refs / "scene_park" / "park.jpg")
    return root


def test_creator_folder_pairs_clips_with_subjects_and_caches_them(tmp_path, creator_folder, encoders):
    skipped = SkipCounter()
    entries = {e.video.stem: e for e in read_folder(creator_folder, skipped, max_references=3)}
    assert set(entries) == {"walk", "run"}
    assert [(r.subject, r.scene, len(r.views)) for r in entries["walk"].references] == \
        [("alice", False, 2), ("park", True, 1)]  # named in the caption, in caption order
    assert [r.subject for r in entries["run"].references] == ["bob", "alice"]  # from run.subjects.txt
    assert entries["run"].references[0].views[0].mask.name == "photo_mask.png"
    reasons = dict(skipped.entries)
    assert "no caption" in reasons[str(creator_folder / "clips" / "nocaption.mp4")]
    assert "names no subject" in reasons[str(creator_folder / "clips" / "nobody.mp4")]

    settings = CacheSettings(sizes=((64, 48), (48, 64)), frames=(5, 9), fps=None, augment_copies=2)
    cache_dir = tmp_path / "cache"
    build_cache(list(entries.values()), cache_dir, settings, encoders, progress=False)
    write_index(list(entries.values()), cache_dir)
    cache = FeatureCache(cache_dir)
    buckets = {s["source"].split("/")[-1]: tuple(s["bucket"]) for s in cache.samples}
    assert buckets == {"walk.mp4": (64, 48, 9), "run.mp4": (48, 64, 9)}  # landscape and portrait buckets
    walk = cache[[s["source"].endswith("walk.mp4") for s in cache.samples].index(True)]
    assert walk["video_latents"].shape == (16, 3, 6, 8)
    assert walk["reference_latents"].shape == (2, 2, 16, 6, 8) and walk["vfm_tokens"].shape == (2, 2 * 12, 3)
    # the two augmented copies use alice's two photos (a blue disc, then a green one): different latents
    assert not torch.allclose(walk["reference_latents"][0, 0], walk["reference_latents"][1, 0], atol=0.1)


def test_scene_references_stay_whole_and_subjects_are_cut_out(creator_folder):
    from refalign_core.training.cache import reference_images

    entry = [e for e in read_folder(creator_folder, SkipCounter()) if e.video.stem == "walk"][0]
    alice, park = reference_images(entry, 64, 48, copy=0)
    assert alice[:, 0, 0].min() > 0.99  # outside the disc: white (alpha used as the mask)
    assert alice[2, 24, 32] > 0.8 and alice[0, 24, 32] < 0.2  # the blue disc, centred
    assert (park[1] > 0.4).float().mean() > 0.9 and park[0, 24, 32] < 0.2  # the green park fills the frame


def opens2v_record(video_name, subjects, crop=(8, 88, 0, 64), face_cut=(2, 15)):
    """One OpenS2V-5M record (the layout of its mask_and_bbox JSON) with COCO-RLE masks on the cropped frame."""
    from pycocotools import mask as coco_mask

    x1, x2, y1, y2 = crop
    h, w = y2 - y1, x2 - x1
    annotations, masks, names = [], {}, {}
    for i, (name, box, aes, gme) in enumerate(subjects, start=1):
        m = np.zeros((h, w), np.uint8, order="F")
        m[box[1]:box[3], box[0]:box[2]] = 1
        rle = coco_mask.encode(np.asfortranarray(m[:, :, None]))[0]
        masks[str(i)] = {"size": [h, w], "counts": rle["counts"].decode(), "score": [0.9]}
        annotations.append({"class_name": name, "bbox": [float(v) for v in box], "aes_score": aes, "gme_score": gme})
        names[str(i)] = {"class_name": name}
    return {"metadata": {"path": video_name, "cut": [0, 17], "face_cut": list(face_cut), "crop": list(crop),
                         "fps": 16, "num_frames": 17, "face_cap_qwen": "a red square slides right",
                         "cap": ["older caption"]},
            "annotation": {"ann_frame_data": {"ann_frame_idx": face_cut[0], "annotations": annotations,
                                              "box_format": "xyxy", "img_width": w, "img_height": h},
                           "mask_map": names, "mask_annotation": {str(face_cut[0]): masks}}}


def test_opens2v_reader_filters_subjects_and_cuts_them_from_the_frame(tmp_path, encoders):
    videos = tmp_path / "Videos"
    videos.mkdir()
    video(videos / "clip_a.mp4", 96, 64)
    video(videos / "clip_b.mp4", 96, 64)
    records = {
        "clip_a_segment_1": opens2v_record("clip_a.mp4", [
            ("red square", (0, 16, 48, 40), 4.8, 0.2),  # kept: aesthetic ≥ 4.5, box 48x24 of 80x64
            ("person", (50, 10, 80, 60), 3.0, 0.7),  # kept by GME, the largest
            ("logo", (60, 0, 64, 4), 5.0, 0.9),  # too small (< 10 % of the frame)
            ("tree", (0, 0, 40, 40), 4.0, 0.5),  # fails both scores
        ]),
        "clip_b_segment_1": opens2v_record("clip_b.mp4", [("tree", (0, 0, 40, 40), 4.0, 0.5)]),
    }
    (tmp_path / "total_part1.json").write_text(json.dumps(records))
    skipped = SkipCounter()
    entries = read_opens2v(tmp_path / "total_part1.json", videos, None, skipped, max_references=3)
    assert len(entries) == 1 and skipped.total == 1 and "release filter" in skipped.entries[0][1]
    entry = entries[0]
    assert entry.caption == "a red square slides right" and entry.frame_range == (2, 15)
    assert entry.crop == (8, 0, 88, 64)  # OpenS2V's [x1, x2, y1, y2] as (x0, y0, x1, y1)
    assert [r.subject for r in entry.references] == ["person", "red square"]  # by mask area, largest first
    image, mask = entry.references[1].views[0].load()
    assert image.size == (80, 64) and mask.size == (80, 64)
    cut = np.asarray(mask) > 0
    assert cut[16:40, 0:48].all() and cut.sum() == 48 * 24
    settings = CacheSettings(sizes=((96, 64),), frames=(9,), fps=None, augment_copies=1)
    build_cache(entries, tmp_path / "cache", settings, encoders, progress=False)
    index = write_index(entries, tmp_path / "cache")
    assert index["samples"][0]["bucket"] == [96, 64, 9] and index["samples"][0]["references"] == 2


def test_buckets_fit_aspect_and_length_and_batches_never_mix_shapes():
    sizes = [(64, 48), (48, 64), (64, 64)]
    assert assign_bucket(1920, 1080, 200, sizes, [9, 17]) == (64, 48, 17)
    assert assign_bucket(720, 1280, 12, sizes, [9, 17]) == (48, 64, 9)
    assert assign_bucket(500, 500, 8, sizes, [9, 17]) is None  # shorter than every frame bucket
    buckets = [(64, 48, 17)] * 7 + [(48, 64, 9)] * 5 + [(64, 64, 17)] * 2
    repeats = [1] * 12 + [3, 1]
    seen = []
    for rank in range(2):
        stream = iter(BucketBatchSampler(buckets, repeats, batch_size=3, seed=5, rank=rank, world_size=2))
        batches = [next(stream) for _ in range(20)]
        assert all(len({buckets[i] for i in batch}) == 1 for batch in batches)  # one shape per batch
        seen.append(batches)
    sampler = BucketBatchSampler(buckets, repeats, 3, 5, world_size=2)
    assert sampler.per_process * 2 == len(sampler.epoch_batches(0))
    drawn = [i for batch in sampler.epoch_batches(0) for i in batch]
    assert drawn.count(12) >= 3 and drawn.count(0) >= 1  # repeats: clip 12 comes 3 times an epoch
    resumed = iter(BucketBatchSampler(buckets, repeats, 3, 5, rank=1, world_size=2, start=7))
    assert [next(resumed) for _ in range(13)] == seen[1][7:]  # a resumed run draws what the first drew


def test_batches_can_hold_one_reference_count_each(tmp_path):
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    samples = [{"key": str(i), "bucket": [64, 64, 5], "references": 1 + i % 3, "repeats": 1, "source": str(i)}
               for i in range(12)]
    (cache_dir / "index.json").write_text(json.dumps({"samples": samples}))
    write_safetensors({"prompt_embeds": torch.zeros(1, 4)}, cache_dir / "null_prompt.safetensors")
    cache = FeatureCache(cache_dir)
    assert cache.batch_groups() == [(64, 64, 5)] * 12
    groups = cache.batch_groups(by_references=True)
    batches = BucketBatchSampler(groups, cache.repeats, 4, seed=0).epoch_batches(0)
    assert all(len({samples[i]["references"] for i in batch}) == 1 for batch in batches)
    assert sorted(i for batch in batches for i in batch) == list(range(12))


def test_cache_resumes_where_it_stopped_and_refuses_other_settings(tmp_path, creator_folder, encoders, monkeypatch):
    import refalign_core.training.cache as cache_module

    entries = read_folder(creator_folder, SkipCounter())
    settings = CacheSettings(sizes=((64, 48),), frames=(5,), fps=None, augment_copies=1)
    cache_dir = tmp_path / "cache"
    fingerprint = {"settings": {"augment_copies": 1}, "vae": "a"}
    check_fingerprint(cache_dir, fingerprint)
    assert build_cache(entries, cache_dir, settings, encoders, progress=False) == 2
    first = {p.name: p.stat().st_mtime_ns for p in (cache_dir / "samples").iterdir()}
    victim = sorted(p for p in (cache_dir / "samples").iterdir())[0]
    victim.unlink()  # as if the build had been killed before this clip
    encoded = []
    original = cache_module.encode_clip
    monkeypatch.setattr(cache_module, "encode_clip", lambda entry, *a: encoded.append(entry) or original(entry, *a))
    assert len(missing_entries(entries, cache_dir)) == 1
    assert build_cache(entries, cache_dir, settings, encoders, progress=False) == 1 and len(encoded) == 1
    after = {p.name: p.stat().st_mtime_ns for p in (cache_dir / "samples").iterdir()}
    assert {k: v for k, v in after.items() if k != victim.name} == {k: v for k, v in first.items()
                                                                   if k != victim.name}
    assert build_cache(entries, cache_dir, settings, encoders, progress=False) == 0  # nothing left to do
    check_fingerprint(cache_dir, fingerprint)  # same settings: fine
    with pytest.raises(RefAlignInputError, match="other settings, vae"):
        check_fingerprint(cache_dir, {"settings": {"augment_copies": 4}, "vae": "b"})


def test_a_cache_for_no_alignment_holds_no_vfm_features_and_a_cache_with_them_serves_it(tmp_path, creator_folder,
                                                                                        encoders):
    entries = read_folder(creator_folder, SkipCounter())
    settings = CacheSettings(sizes=((64, 48),), frames=(5,), fps=None, augment_copies=1, vfm_features=False)
    assert build_cache(entries, tmp_path / "plain", settings, encoders, progress=False) == 2
    samples = [read_safetensors(f, "sample")[0] for f in (tmp_path / "plain" / "samples").glob("*.safetensors")]
    assert len(samples) == 2 and all("reference_latents" in s and "vfm_tokens" not in s for s in samples)
    with_vfm, without = {"settings": {}, "vfm": "efficientnet-lite0"}, {"settings": {}, "vfm": "none"}
    check_fingerprint(tmp_path / "aligned", with_vfm)
    check_fingerprint(tmp_path / "aligned", without)  # a superset: served
    check_fingerprint(tmp_path / "unaligned", without)
    with pytest.raises(RefAlignInputError, match="other vfm"):
        check_fingerprint(tmp_path / "unaligned", with_vfm)


def test_prepare_reports_counts_skips_histograms_and_a_contact_sheet(tmp_path, creator_folder):
    from refalign_core.training.report import main

    (creator_folder / "clips" / "broken.mp4").write_bytes(b"not a video")
    (creator_folder / "clips" / "broken.txt").write_text("alice falls")
    out = tmp_path / "report"
    assert main(["--dataset", str(creator_folder), "--out", str(out), "--set", "data.buckets.sizes=[[64, 48]]",
                 "--set", "data.buckets.frames=[9, 33]", "--set", "data.fps=16"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["entries"] == 5 and report["usable"] == 2 and report["skipped"] == 3
    reasons = {Path(e["entry"]).name: e["reason"] for e in report["skipped_entries"]}
    assert "no caption" in reasons["nocaption.mp4"] and "names no subject" in reasons["nobody.mp4"]
    assert "cannot be read" in reasons["broken.mp4"]
    assert dict(report["histograms"]["bucket"]) == {"64x48x9": 2}
    assert dict(report["histograms"]["resolution"]) == {"96x64": 1, "64x96": 1}
    assert Image.open(out / "contact_sheet.png").size[1] > 2 * 96  # a row per usable clip: frame + references
    assert "broken.mp4" in (out / "report.md").read_text()
    assert main(["--dataset", str(tmp_path / "missing"), "--format", "folder", "--out", str(out)]) == 2
