"""Identity metrics on videos built from real photographs, where the right answer is known."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from refalign_core.errors import RefAlignInputError
from refalign_core.metrics.eval import main as eval_main
from refalign_core.metrics.faces import FaceEmbedder
from refalign_core.metrics.identity import check_identity, motion_amplitude
from refalign_core.metrics.identity_sheet import contact_sheet
from refalign_core.inference.video_io import write_video
from refalign_core.models.vfm import load_vfm

from scenes import background, moving_video, paste, subject


@pytest.fixture(scope="module")
def vfm():
    return load_vfm("efficientnet-lite0")


def score(vfm, refs, video, **kwargs):
    return check_identity([subject(n) for n in refs], video, vfm, names=refs, **kwargs)


def test_same_subject_moved_and_rescaled_beats_a_different_subject(vfm):
    same = score(vfm, ["cat"], moving_video(["cat"]))
    other = score(vfm, ["cat"], moving_video(["cup"]))
    assert same.subjects[0].mean > other.subjects[0].mean + 0.1
    assert same.subjects[0].min > other.subjects[0].mean
    assert same.subjects[0].global_mean > other.subjects[0].global_mean
    assert len(same.subjects[0].per_frame) == 17 == len(same.subjects[0].boxes)


def test_best_region_follows_the_subject(vfm):
    video = moving_video(["cup"])
    report = score(vfm, ["cup"], video)
    first, last = report.subjects[0].boxes[0], report.subjects[0].boxes[-1]
    assert (last[0] + last[2]) / 2 > (first[0] + first[2]) / 2 + 40  # the cup moves right by ~70 px


def test_static_paste_is_copy_paste_moving_subject_is_not(vfm):
    static = score(vfm, ["cat", "cup"], moving_video(["cat", "cup"], static=True))
    moving = score(vfm, ["cat", "cup"], moving_video(["cat", "cup"]))
    assert static.copy_paste_flags == ["cat", "cup"]
    assert moving.copy_paste_flags == []
    assert static.subjects[0].copy_paste["pixel_similarity"] > moving.subjects[0].copy_paste["pixel_similarity"]
    assert static.motion_amplitude < 0.01 < moving.motion_amplitude


def test_a_still_different_subject_is_not_copy_paste(vfm):
    assert score(vfm, ["cat"], moving_video(["cup"], static=True)).copy_paste_flags == []


def test_two_subjects_collapsing_into_one_is_flagged_as_confusion(vfm):
    both = score(vfm, ["cat", "cup"], moving_video(["cat", "cup"]))
    collapsed = score(vfm, ["cat", "cup"], moving_video(["cat", "cat"]))  # the cup became a second cat
    assert both.confusion_flags == []
    assert any("cup" in f and "cat's reference" in f for f in collapsed.confusion_flags)
    m = np.array(both.confusion_matrix)
    assert m[0, 0] > m[1, 0] and m[1, 1] > m[0, 1]


def test_face_mode_finds_and_matches_a_real_face(vfm):
    faces = FaceEmbedder()
    same = score(vfm, ["astronaut"], moving_video(["astronaut"], height=360, width=640, size=200),
                 face_embedder=faces)
    face = same.subjects[0].face
    assert face["reference_face"] and face["frames_with_face"] == 17
    assert face["match_rate"] == 1.0 and face["distance_mean"] < 0.6
    no_face = score(vfm, ["astronaut"], moving_video(["cup"], height=360, width=640, size=200),
                    face_embedder=faces)
    assert no_face.subjects[0].face["frames_with_face"] == 0
    import skimage.data
    person = np.array(Image.fromarray((skimage.data.lfw_subset()[0] * 255).astype(np.uint8)).resize((150, 150)))
    frames = []
    for t in range(5):
        frame = background(360, 640).clone()
        paste(frame, torch.from_numpy(np.stack([person] * 3, -1)).float() / 255, 40 + 20 * t, 60, 200)
        frames.append(frame)
    other = score(vfm, ["astronaut"], torch.stack(frames), face_embedder=faces).subjects[0].face
    assert other["frames_with_face"] == 5 and other["match_rate"] == 0 and other["distance_mean"] > 0.6


def test_motion_amplitude_is_the_mean_signed_flow():
    frames = np.zeros((5, 96, 128, 3), np.uint8)
    for t in range(5):
        frames[t, 30:60, 20 + 6 * t:50 + 6 * t] = 255  # a square moving right by 6 px per frame
    assert motion_amplitude(frames, short_side=96) > 0.3
    assert motion_amplitude(np.repeat(frames[:1], 5, 0)) == 0


def test_report_outputs_json_summary_and_sheet(vfm):
    video = moving_video(["cat", "cup"], frames=9)
    report = score(vfm, ["cat", "cup"], video)
    data = json.loads(json.dumps(report.to_dict()))
    assert data["subjects"][1]["name"] == "cup" and len(data["confusion_matrix"]) == 2
    assert "cat: mean" in report.summary()
    sheet = contact_sheet(report, [subject("cat"), subject("cup")], video)
    assert sheet.width > 400 and sheet.height > 400
    with pytest.raises(RefAlignInputError):
        check_identity([], video, vfm)


def test_eval_cli_scores_cases_and_reports_a_missing_video(vfm, tmp_path):
    (tmp_path / "refs").mkdir()
    (tmp_path / "videos").mkdir()
    for name in ("cat", "cup"):
        Image.fromarray((subject(name).numpy() * 255).astype(np.uint8)).save(tmp_path / "refs" / f"{name}.png")
    write_video(moving_video(["cat", "cup"], frames=9), tmp_path / "videos" / "good.mp4")
    write_video(moving_video(["cat", "cat"], frames=9), tmp_path / "videos" / "mixed.mp4")
    (tmp_path / "videos" / "broken.mp4").write_bytes(b"not a video")
    cases = {name: {"prompt": "a cat and a cup", "references": ["refs/cat.png", "refs/cup.png"], "names": ["cat", "cup"]}
             for name in ("good", "mixed", "broken", "absent")}
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    assert eval_main(["--cases", str(tmp_path / "cases.json"), "--videos", str(tmp_path / "videos"),
                      "--out", str(tmp_path / "report"), "--sample-frames", "8"]) == 0
    rows = {r.split(",")[0]: r.split(",") for r in (tmp_path / "report" / "summary.csv").read_text().splitlines()[1:]}
    assert rows["good"][1] == "ok" and rows["mixed"][1] == "ok"
    assert rows["broken"][1] == "failed" and rows["absent"][1] == "failed"
    assert int(rows["mixed"][6]) > int(rows["good"][6]) == 0  # confusion flags
    assert (tmp_path / "report" / "sheets" / "good.png").is_file()
    assert json.loads((tmp_path / "report" / "cases" / "mixed.json").read_text())["confusion_flags"]
    assert "**mean**" in (tmp_path / "report" / "summary.md").read_text()


def test_reference_records_bring_their_mask_and_name(vfm):
    image = torch.ones(32, 32, 3)
    image[8:24, 8:24] = torch.tensor([1.0, 0.0, 0.0])
    mask = torch.zeros(32, 32)
    mask[8:24, 8:24] = 1
    frames = torch.rand(3, 64, 64, 3)
    from refalign_core.inference.references import Reference
    recorded = check_identity([Reference(image, mask, "red square")], frames, vfm)
    explicit = check_identity([image], frames, vfm, masks=[mask], names=["red square"])
    assert [s.name for s in recorded.subjects] == ["red square"]
    assert recorded.subjects[0].mean == explicit.subjects[0].mean  # the same mask was used
    assert check_identity([image], frames, vfm).subjects[0].mean != explicit.subjects[0].mean
