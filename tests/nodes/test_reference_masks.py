"""Background removal, ComfyUI's way: Multi-Subject Reference takes the MASK of a background-removal node (white =
subject, e.g. Recraft Remove Background's) or Load Image's alpha mask through Invert Mask, and whitens the rest."""

import comfy_stubs
import pytest
import torch

from pack import load_pack, pack_nodes


@pytest.fixture
def reference_node(tmp_path):
    comfy_stubs.install(tmp_path)
    yield pack_nodes(load_pack())["RefAlignMultiSubjectReference"]
    comfy_stubs.uninstall()


def cut_out_photo():
    """A red subject on a busy background: IMAGE `[1, H, W, 3]` and its subject mask `[1, H, W]`."""
    image = torch.rand(1, 48, 64, 3, generator=torch.Generator().manual_seed(0)) * 0.5
    subject = torch.zeros(1, 48, 64)
    subject[:, 12:36, 20:44] = 1.0
    image[subject.bool()] = torch.tensor([0.9, 0.1, 0.1])
    return image, subject


def test_a_background_removal_mask_whitens_the_background_and_keeps_the_subject(reference_node):
    image, subject = cut_out_photo()
    load_image_alpha_mask = 1.0 - subject  # Load Image: white where the PNG is transparent
    for mask in (subject, 1.0 - load_image_alpha_mask):  # a removal node's MASK; Load Image → Invert Mask
        preview = reference_node.execute(64, 64, image_1=image, mask_1=mask).result[1][0]  # [64, 64, 3]
        red = (preview[..., 0] > 0.8) & (preview[..., 1] < 0.2)
        white = (preview > 0.98).all(dim=-1)
        assert red.sum() > 0.5 * 64 * 64  # cropped to the subject, which fills the frame
        assert bool((red | white).all())  # nothing of the background is left
    # without the mask the busy background stays: the reason to wire one
    plain = reference_node.execute(64, 64, image_1=image).result[1][0]
    assert not bool(((plain[..., 0] > 0.8) | (plain > 0.98).all(dim=-1)).all())
