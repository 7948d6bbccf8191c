import numpy as np
import pytest
import torch
from PIL import Image

from refalign_core.errors import RefAlignInputError
from refalign_core.inference.references import Reference, encode_references, fit_on_white, prepare_references
from refalign_core.models.vae import encode_video


def test_wide_image_is_fitted_and_padded_with_white_not_cropped():
    image = torch.zeros(20, 80, 3)  # black, 4:1, ComfyUI [H,W,C]
    out = fit_on_white(image, width=64, height=64)
    assert out.shape == (3, 64, 64)
    # the whole width is kept (no crop) and the rest is white
    assert out[:, 32, :].max() < 0.01
    assert out[:, :20, :].min() == 1 and out[:, -20:, :].min() == 1
    rows = (out.mean(0) < 0.5).any(1).nonzero().flatten()
    assert rows.min() >= 23 and rows.max() <= 40


def test_mask_whitens_background_and_crops_to_subject():
    image = torch.zeros(3, 40, 40)
    image[0] = 1.0  # red everywhere
    mask = torch.zeros(40, 40)
    mask[10:20, 10:30] = 1
    out = fit_on_white(image, 32, 32, mask=mask)
    red = (out[0] > 0.9) & (out[1] < 0.1)
    assert red.any()
    cols = red.any(0).nonzero().flatten()
    assert cols.min() == 0 and cols.max() == 31  # the 20-wide subject now fills the width
    assert out[:, 0, :].min() == 1  # above the subject: white, not red background


def test_rgba_and_grayscale_inputs():
    rgba = Image.new("RGBA", (30, 30), (0, 0, 255, 0))
    rgba.paste((0, 0, 255, 255), (5, 10, 25, 20))  # a 20x10 opaque subject: fitted to 16x8, white above/below
    out = fit_on_white(rgba, 16, 16)
    assert out[:, 0, 0].tolist() == [1.0, 1.0, 1.0]
    assert fit_on_white(rgba, 16, 16, crop_to_mask=False)[:, 1, 1].tolist() == [1.0, 1.0, 1.0]
    assert out[2, 8, 8] > 0.9 and out[0, 8, 8] < 0.1
    gray = np.full((24, 24), 128, dtype=np.uint8)
    out = fit_on_white(gray, 16, 16)
    assert torch.allclose(out[0], out[1]) and abs(out[0, 8, 8].item() - 128 / 255) < 1e-3


def test_bad_reference_inputs_are_refused():
    with pytest.raises(RefAlignInputError, match="at least one"):
        prepare_references([], 64, 64)
    with pytest.raises(RefAlignInputError, match="multiples of 16"):
        prepare_references([torch.rand(8, 8, 3)], 60, 64)
    with pytest.raises(RefAlignInputError, match="at most 4"):
        prepare_references([torch.rand(8, 8, 3)] * 5, 64, 64, max_references=4)
    with pytest.raises(RefAlignInputError, match="mask"):
        fit_on_white(torch.rand(8, 8, 3), 16, 16, mask=torch.zeros(8, 8))
    with pytest.raises(RefAlignInputError, match="as a list"):  # one [H,W,3] image would read as H references
        prepare_references(torch.rand(20, 30, 3), 64, 64)


def test_reference_records_carry_their_mask_and_name(caplog):
    image = torch.rand(20, 30, 3)
    mask = torch.zeros(20, 30)
    mask[5:15, 5:20] = 1
    masked = prepare_references([Reference(image, mask, name="cup"), image], 32, 32)
    assert masked[0, :, 0, 0].tolist() == [1.0, 1.0, 1.0] and not torch.equal(masked[0], masked[1])
    assert prepare_references(torch.stack([image, image]), 32, 32).shape == (2, 3, 32, 32)  # an IMAGE batch
    with pytest.raises(RefAlignInputError, match="cup mask is empty"):
        prepare_references([Reference(image, torch.zeros(20, 30), name="cup")], 32, 32)
    with caplog.at_level("WARNING"):
        prepare_references([image] * 4, 32, 32)
    assert "trained with at most 3" in caplog.text


def test_each_reference_is_encoded_alone_as_one_frame(vae):
    refs = prepare_references([torch.rand(30, 40, 3), torch.rand(50, 20, 3)], 32, 48)
    latents = encode_references(vae, refs)
    assert latents.shape == (1, 16, 2, 6, 4)
    for k in range(2):
        alone = encode_video(vae, refs[k : k + 1].mul(2).sub(1).unsqueeze(2))
        torch.testing.assert_close(latents[:, :, k : k + 1], alone, rtol=1e-4, atol=1e-5)
    as_clip = encode_video(vae, refs.mul(2).sub(1).permute(1, 0, 2, 3).unsqueeze(0))  # one 2-frame video
    assert not torch.allclose(as_clip[:, :, :1], latents[:, :, 1:2], atol=1e-3)
