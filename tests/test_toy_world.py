import json

import numpy as np

from refalign_core.toy_world import all_subjects, make_toy_world, render_subject, vocabulary
from refalign_core.training.data import SkipCounter
from refalign_core.training.datasets import read_jsonl
from refalign_core.video_io import read_video_frames


def test_identities_are_split_without_overlap():
    train, held_out = all_subjects()
    assert len(held_out) == 16 and len(train) > 200
    assert not {s.id for s in train} & {s.id for s in held_out}
    assert len({s.id for s in train + held_out}) == len(train) + len(held_out)


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
    assert read_video_frames(entries[0].video).shape == (17, 64, 64, 3)
    words = set(vocabulary())
    assert all(set(e.caption.split()) <= words for e in entries)
    for entry in entries:
        for ref in entry.references:
            assert ref.subject.split("_")[0] in entry.caption


def test_held_out_split_uses_only_held_out_subjects(tmp_path):
    _, held_out = all_subjects()
    manifest = make_toy_world(tmp_path, num_videos=6, split="held_out")
    subjects = {r["subject"] for line in manifest.read_text().splitlines() for r in json.loads(line)["references"]}
    assert subjects <= {s.id for s in held_out}


def test_subjects_differ_in_pixels():
    train, _ = all_subjects()
    a, b = (np.asarray(render_subject(s, 32)).astype(float) for s in train[:2])
    assert np.abs(a - b).mean() > 5
