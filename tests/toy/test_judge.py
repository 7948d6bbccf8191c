"""The world judge, checked on the three outputs every instrument must get right before it decides anything: the
world's own clips (ground truth), an empty video, and deliberately confused videos."""

import numpy as np
import pytest
import torch

from refalign_core.toy.demo import SHIPPED_BUNDLE
from refalign_core.toy.judge import (JUDGE_FILE, WorldJudge, calibrate, degrade, lane_crops, render_world_clips,
                                     through_vae)
from refalign_core.toy.world import BACKGROUND, FRAMES, SIZE, Subject, all_subjects, plan_tracks, render_clip
from refalign_core.models.vae import load_vae

pytestmark = pytest.mark.skipif(not JUDGE_FILE.is_file(), reason="the shipped judge is built by the toy recipe")


@pytest.fixture(scope="module")
def judge():
    return WorldJudge.load()


@pytest.fixture(scope="module")
def held_out_clips():
    return render_world_clips(12, seed=123, pool=all_subjects()[1])


def test_ground_truth_is_judged_right_and_unconfused(judge, held_out_clips):
    videos, cases = held_out_clips
    verdicts = [judge(video, subjects) for video, subjects in zip(videos, cases)]
    assert np.mean([v.accuracy for v in verdicts]) >= 0.9
    assert np.mean([v.confusion for v in verdicts]) <= 0.05
    assert all(s.present == 1.0 for v in verdicts for s in v.subjects)


def test_soft_decoded_looking_frames_are_still_judged_right(judge, held_out_clips):
    videos, cases = held_out_clips
    generator = torch.Generator().manual_seed(0)
    accuracy = [judge(degrade(video, generator), subjects).accuracy for video, subjects in zip(videos, cases)]
    assert np.mean(accuracy) >= 0.85


def test_an_empty_video_is_wrong_everywhere_and_confused_nowhere(judge):
    grey = torch.tensor(BACKGROUND, dtype=torch.float32).div(255).expand(FRAMES, SIZE, SIZE, 3).clone()
    subjects = [Subject("disc", "red", "plain", "red"), Subject("square", "blue", "striped", "pink")]
    verdict = judge(grey, subjects)
    assert verdict.accuracy == 0 and verdict.confusion == 0
    assert all(s.present == 0 for s in verdict.subjects)


def test_swapped_lanes_are_confused_in_every_frame(judge, held_out_clips):
    _, cases = held_out_clips
    confusion, accuracy = [], []
    for subjects in cases:
        if len(subjects) < 2:
            continue
        swapped = subjects[1:] + subjects[:1]  # lane i shows the subject of lane i + 1
        video = render_clip(plan_tracks(swapped, [1] * len(swapped)), BACKGROUND, FRAMES, SIZE)
        verdict = judge(video, subjects)
        confusion.append(verdict.confusion), accuracy.append(verdict.accuracy)
    assert np.mean(confusion) >= 0.9 and np.mean(accuracy) <= 0.1


def test_a_colour_leaking_into_the_other_lane_is_confusion_of_that_lane_only(judge):
    red_disc, blue_square = Subject("disc", "red", "plain", "red"), Subject("square", "blue", "striped", "pink")
    leaked = Subject("square", "red", "striped", "pink")  # the square took the disc's colour
    video = render_clip(plan_tracks([red_disc, leaked], [1, -1]), BACKGROUND, FRAMES, SIZE)
    verdict = judge(video, [red_disc, blue_square])
    assert verdict.subjects[0].accuracy == 1 and verdict.subjects[0].confusion == 0
    assert verdict.subjects[1].confusion == 1 and verdict.subjects[1].attributes["shape"] == 1


def test_lane_crops_follow_the_subject_along_its_lane():
    subject = Subject("disc", "red", "plain", "red")
    video = render_clip(plan_tracks([subject, subject], [1, -1]), BACKGROUND, FRAMES, SIZE)
    crops, present = lane_crops(video, 2)
    assert crops.shape == (FRAMES, 2, 3, 32, 32) and present.all()
    red = torch.tensor([215, 45, 45]) / 255
    centre = crops[:, :, :, 12:20, 12:20].mean((-1, -2))  # [F, 2, 3]
    assert (centre - red[None, None]).abs().max() < 0.05  # the crop is centred on the moving disc in every frame


def test_calibration_reports_the_ceiling(judge):
    result = calibrate(judge, clips=8)
    assert result["lanes"] >= 8 and 0.9 <= result["accuracy"] <= 1 and result["confusion"] <= 0.05


def test_the_vae_ceiling_judges_each_clip_after_an_encode_and_decode(judge, held_out_clips):
    vae = load_vae(SHIPPED_BUNDLE / "vae.safetensors")
    video = held_out_clips[0][0]
    decoded = through_vae(vae, video)
    assert decoded.shape == video.shape and 0 <= decoded.min() and decoded.max() <= 1
    assert (decoded - video).abs().mean() < 0.1  # the shipped VAE gives the clip back, if softly
    flat = load_vae(SHIPPED_BUNDLE / "vae.safetensors")  # decodes every latent to the background
    last = flat.decoder[-1]
    last.weight.data.zero_()
    last.bias.data.copy_(torch.tensor(BACKGROUND).div(255).mul(2).sub(1).repeat(last.bias.numel() // 3))
    result = calibrate(judge, clips=4, vae=flat)
    assert result["accuracy"] == 0 and result["confusion"] == 0
    assert calibrate(judge, clips=4, vae=vae)["accuracy"] > 0


def test_the_judge_refuses_what_it_cannot_score(judge):
    with pytest.raises(ValueError, match="video"):
        judge(torch.zeros(FRAMES, SIZE, SIZE), [Subject("disc", "red", "plain", "red")])
    with pytest.raises(ValueError, match="1–3 subjects"):
        judge(torch.zeros(FRAMES, SIZE, SIZE, 3), [])
