import json

import numpy as np
import torch

from refalign_core.toy.world import (FRAMES, SIZE, all_subjects, caption, make_toy_world, plan_tracks, render_clip,
                                     render_subject, sample_case, vocabulary)
from refalign_core.training.data import SkipCounter
from refalign_core.training.datasets import read_jsonl
from refalign_core.inference.video_io import read_video_frames


def test_identities_are_split_without_overlap_and_every_held_out_attribute_is_seen_in_training():
    train, held_out = all_subjects()
    assert len(held_out) == 24 and len(train) > 200
    assert not {s.id for s in train} & {s.id for s in held_out}
    assert len({s.id for s in train + held_out}) == len(train) + len(held_out)
    for attribute in ("shape", "colour", "pattern"):
        assert {getattr(s, attribute) for s in held_out} <= {getattr(s, attribute) for s in train}


def test_generator_is_deterministic_and_writes_the_manifest_format(tmp_path):
    a = make_toy_world(tmp_path / "a", num_videos=4, seed=3)
    b = make_toy_world(tmp_path / "b", num_videos=4, seed=3)
    assert a.read_text() == b.read_text()
    for name in ("refs/00001_0.png", "refs/00001_0_mask.png"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    for video in sorted((tmp_path / "a" / "videos").iterdir()):  # x264 bytes may vary; the decoded frames may not
        assert np.array_equal(read_video_frames(video), read_video_frames(tmp_path / "b" / "videos" / video.name))
    entries = read_jsonl(a, SkipCounter())
    assert len(entries) == 4 and all(1 <= len(e.references) <= 3 for e in entries)
    assert read_video_frames(entries[0].video).shape == (FRAMES, SIZE, SIZE, 3)
    words = set(vocabulary())
    for entry in entries:
        assert set(entry.caption.split()) <= words
        # the caption names each subject's shape, in reference order, and never its colour or pattern
        shapes = [ref.subject.split("_")[-1] for ref in entry.references]
        assert [w for w in entry.caption.split() if w in {s.split("_")[-1] for s in shapes}] == shapes
        assert not {ref.subject.split("_")[0] for ref in entry.references} & set(entry.caption.split())


def test_subjects_keep_their_lanes_in_reference_order_and_move_as_the_caption_says():
    train, _ = all_subjects()
    rng = np.random.default_rng(0)
    for _ in range(20):
        tracks = sample_case(train, rng, 1, 3)
        assert len({t.subject.shape for t in tracks}) == len(tracks)  # the caption tells them apart by shape
        clip = render_clip(tracks)
        assert clip.shape == (FRAMES, SIZE, SIZE, 3) and 0 <= clip.min() and clip.max() <= 1
        tops = [t.start[1] for t in tracks]
        assert tops == sorted(tops) and all(b - a >= tracks[0].size for a, b in zip(tops, tops[1:]))  # top to bottom
        for track, word in zip(tracks, caption(tracks).split(" and ")):
            x0, y0 = track.position(0, FRAMES)
            x1, y1 = track.position(FRAMES - 1, FRAMES)
            assert y0 == y1 and {"right": x1 - x0 > 40, "left": x0 - x1 > 40}[word.split()[-1]]
            assert 0 <= min(x0, x1, y0) and max(x0, x1, y0) + track.size <= SIZE  # inside the frame
    first = render_clip(plan_tracks(train[:2], [1, -1]))[0]
    assert (first[:64] != first[0, 0]).any() and (first[64:] != first[0, 0]).any()  # one subject per lane


def test_held_out_split_uses_only_held_out_subjects(tmp_path):
    _, held_out = all_subjects()
    manifest = make_toy_world(tmp_path, num_videos=6, split="held_out")
    subjects = {r["subject"] for line in manifest.read_text().splitlines() for r in json.loads(line)["references"]}
    assert subjects <= {s.id for s in held_out}


def test_subjects_differ_in_pixels():
    train, _ = all_subjects()
    a, b = (np.asarray(render_subject(s, 32)).astype(float) for s in train[:2])
    assert np.abs(a - b).mean() > 5
    assert torch.is_tensor(render_clip([]))
