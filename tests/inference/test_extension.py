"""Extension: segments that continue the one before (held leading frames, joined without duplicates, colour match)."""

import pytest
import torch

from refalign_core.errors import RefAlignInputError
from refalign_core.inference.extension import Extension, join_segment, match_colors
from refalign_core.inference.pipeline import RefAlignPipeline
from refalign_core.inference.sampler import SamplingSettings, sample_r2v
from tiny_models import TINY_DIT

TEXT = TINY_DIT["text_dim"]
SETTINGS = SamplingSettings(num_frames=9, height=32, width=48, steps=3, shift=3.0)


def text(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 6, TEXT, generator=g), torch.randn(1, 4, TEXT, generator=g)


def references(seed=1):
    return torch.randn(1, 16, 2, 4, 6, generator=torch.Generator().manual_seed(seed))


def test_known_frames_are_held_exactly_and_steer_the_rest(dit):
    plain = sample_r2v(dit, *text(), references(), SETTINGS)
    known = torch.randn(1, 16, 2, 4, 6, generator=torch.Generator().manual_seed(5))
    held = sample_r2v(dit, *text(), references(), SETTINGS, known_latents=known)
    assert torch.equal(held[:, :, :2], known)
    assert not torch.allclose(held[:, :, 2:], plain[:, :, 2:], atol=1e-3)
    # the same known frames and seed give the same segment (nothing random besides the seed)
    assert torch.equal(sample_r2v(dit, *text(), references(), SETTINGS, known_latents=known), held)


@pytest.mark.parametrize("shape", [(1, 16, 3, 4, 6), (1, 16, 0, 4, 6), (1, 16, 1, 4, 5), (1, 8, 1, 4, 6)])
def test_known_latents_of_a_wrong_shape_are_refused(dit, shape):
    with pytest.raises(RefAlignInputError, match="known latents"):
        sample_r2v(dit, *text(), references(), SETTINGS, known_latents=torch.zeros(shape))


@pytest.fixture
def pipe(dit, vae):
    return RefAlignPipeline(dit=dit, vae=vae, settings=SETTINGS)


@pytest.mark.parametrize("seam", ["pixels", "latents"])
def test_three_segments_join_without_duplicated_frames(pipe, seam):
    prompt_embeds, negative_embeds = text()
    run = dict(prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_embeds, reference_latents=references())
    steps = []
    result = pipe(**run, extension=Extension(segments=3, overlap=5, seam=seam),
                  callback=lambda step, total, latents: steps.append((step, total)))
    first = pipe(**run)
    assert result.latents.shape == (3, 16, 3, 4, 6)
    assert result.frames.shape == (9 + 2 * 4, 32, 48, 3)
    assert steps == [(i, 9) for i in range(1, 10)]
    # segment 1 is the ordinary clip; the later ones add only their new frames
    assert torch.equal(result.latents[:1], first.latents)
    assert torch.equal(result.frames[:9], first.frames)
    second = pipe(**run, seed=1)  # segment 2's noise is seed + 1, so it is not segment 1 again
    assert not torch.allclose(result.latents[1], second.latents[0])
    if seam == "latents":  # the previous clip's last 2 latent frames start the next one
        assert torch.equal(result.latents[1, :, :2], result.latents[0, :, -2:])


def test_join_keeps_the_video_at_the_seam_and_color_match_moves_the_statistics():
    g = torch.Generator().manual_seed(0)
    video = torch.rand(9, 8, 8, 3, generator=g) * 0.3 + 0.3
    segment = torch.rand(9, 8, 8, 3, generator=g) * 0.2 + 0.4  # brighter and flatter; matched, nothing clips
    joined = join_segment(video, segment, overlap=5)
    assert joined.shape[0] == 13 and torch.equal(joined[:9], video) and torch.equal(joined[9:], segment[5:])
    matched = match_colors(segment, segment[:5], video[-5:])
    torch.testing.assert_close(matched[:5].mean(dim=(0, 1, 2)), video[-5:].mean(dim=(0, 1, 2)), atol=1e-4, rtol=0)
    torch.testing.assert_close(matched[:5].std(dim=(0, 1, 2)), video[-5:].std(dim=(0, 1, 2)), atol=1e-4, rtol=0)
    assert torch.equal(join_segment(video, segment, 5, color_match=True)[9:], matched[5:])
    with pytest.raises(RefAlignInputError, match="overlap"):
        join_segment(video, segment, overlap=9)
    with pytest.raises(RefAlignInputError, match="segment"):
        join_segment(video, segment[:, :4], overlap=1)


@pytest.mark.parametrize("changes,match", [({"segments": 0}, "segments"), ({"overlap": 4}, "4n\\+1"),
                                           ({"seam": "frames"}, "seam"), ({"color_match": "yes"}, "color_match")])
def test_bad_extension_settings_are_refused(changes, match):
    with pytest.raises(RefAlignInputError, match=match):
        Extension(**changes)


def test_an_overlap_that_leaves_no_new_frames_is_refused_before_sampling(pipe):
    with pytest.raises(RefAlignInputError, match="overlap"):
        pipe(prompt_embeds=text()[0], reference_latents=references(), extension=Extension(segments=2, overlap=9))


def test_color_match_on_a_flat_overlap_does_not_blow_the_segment_up():
    g = torch.Generator().manual_seed(2)
    flat = torch.full((5, 8, 8, 3), 0.5) + torch.rand(5, 8, 8, 3, generator=g) * 1e-4  # a fade: almost no contrast
    busy = torch.rand(5, 8, 8, 3, generator=g)
    segment = torch.cat([flat, torch.rand(4, 8, 8, 3, generator=g) * 0.2 + 0.4])
    matched = match_colors(segment, segment[:5], busy)
    per_channel = (0, 1, 2)  # without the bound the scale would be about 3000
    assert (matched[5:].std(dim=per_channel) <= 2.0 * segment[5:].std(dim=per_channel) + 1e-6).all()


def test_held_frames_stay_finite_where_unipc_rounds_the_last_timestep_to_zero(dit):
    settings = SETTINGS.replace(sampler="unipc", steps=50, shift=0.02)
    known = torch.randn(1, 16, 2, 4, 6, generator=torch.Generator().manual_seed(5))
    held = sample_r2v(dit, *text(), references(), settings, known_latents=known)
    assert torch.isfinite(held).all() and torch.equal(held[:, :, :2], known)
