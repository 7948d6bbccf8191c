"""The convolutional token VFM (the toy teacher's architecture, a core VFM) and the shipped toy teacher."""

from pathlib import Path

import numpy as np
import pytest
import torch

from refalign_core.errors import RefAlignInputError
from refalign_core.models.safetensors_io import write_safetensors
from refalign_core.models.vfm import ConvTokenVFM, load_vfm

TEACHER = Path(__file__).parents[2] / "refalign_core" / "toy" / "models" / "teacher.safetensors"


def test_tokens_follow_the_dit_reference_grid():
    vfm = ConvTokenVFM(dim=24, width=16).eval()
    tokens = vfm(torch.rand(2, 3, 128, 96))
    assert tokens.shape == (2, 8 * 6, 24) and vfm.dim == 24
    with pytest.raises(RefAlignInputError, match="multiple of 16"):
        vfm(torch.rand(1, 3, 120, 128))


def test_every_token_carries_the_whole_image():
    torch.manual_seed(0)
    vfm = ConvTokenVFM(dim=16, width=16).eval()
    image = torch.ones(1, 3, 64, 64)
    changed = image.clone()
    changed[..., :16, :16] = 0  # only the top-left patch differs
    a, b = vfm(image)[0], vfm(changed)[0]
    assert (a[-1] - b[-1]).abs().max() > 1e-4  # the far corner's token sees it too


def test_a_saved_teacher_loads_through_load_vfm_bit_exactly(tmp_path):
    vfm = ConvTokenVFM(dim=16, width=16).eval()
    path = vfm.save(tmp_path / "teacher.safetensors")
    loaded = load_vfm(str(path))
    images = torch.rand(2, 3, 64, 64)
    assert isinstance(loaded, ConvTokenVFM) and torch.equal(loaded(images), vfm(images))


def test_a_safetensors_file_that_is_not_a_token_encoder_is_one_clear_error(tmp_path):
    write_safetensors({"weight": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(RefAlignInputError, match="not a convolutional token encoder"):
        load_vfm(str(tmp_path / "other.safetensors"))


@pytest.mark.skipif(not TEACHER.is_file(), reason="the shipped teacher is built by the toy recipe")
def test_the_shipped_teacher_tells_held_out_subjects_apart():
    from refalign_core.toy.teacher import pooled_tokens, reference_set, retrieval_scores
    from refalign_core.toy.world import all_subjects

    _, held_out = all_subjects()
    images, _ = reference_set(held_out, 3, seed=5)
    embeddings = pooled_tokens(load_vfm(str(TEACHER)), images).view(len(held_out), 3, -1)
    assert np.mean(retrieval_scores(embeddings)["retrieval"]) >= 0.9
