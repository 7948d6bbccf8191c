"""RefAlign Segment Latent and Join Segments on ComfyUI stand-ins, against the core's extension rule
(`tools/comfyui_parity.py` runs the 2-segment wiring in the real ComfyUI against the core)."""

import comfy_stubs
import pytest
import torch

from pack import load_pack, pack_nodes
from refalign_core.errors import RefAlignInputError
from refalign_core.inference.bundles import embedded_bundles, read_bundle
from refalign_core.inference.extension import join_segment
from refalign_core.inference.pipeline import VAECodec
from refalign_core.models.vae import load_vae, wan21_to_dit_space


@pytest.fixture
def nodes(tmp_path):
    comfy_stubs.install(tmp_path)
    pack = load_pack()
    yield pack, pack_nodes(pack)
    comfy_stubs.uninstall()


@pytest.fixture(scope="module")
def toy_vae():
    return load_vae(read_bundle(next(iter(embedded_bundles().values()))).vae)


def test_segment_latent_holds_the_last_frames_re_encoded_and_masks_the_rest(nodes, toy_vae):
    pack, node = nodes
    vae = pack.nodes.bundle_models.BundleVAE(toy_vae)
    video = torch.rand(9, 64, 48, 3, generator=torch.Generator().manual_seed(0))
    latent = node["RefAlignSegmentLatent"].execute(vae, video, 48, 64, 9, 5, 2).result[0]
    assert latent["samples"].shape == (2, 16, 3, 8, 6) and latent["noise_mask"].shape == (2, 1, 3, 8, 6)
    assert torch.equal(latent["noise_mask"][:, :, :2], torch.zeros(2, 1, 2, 8, 6))
    assert torch.equal(latent["noise_mask"][:, :, 2:], torch.ones(2, 1, 1, 8, 6))
    # the known frames are the core codec's encoding of the last 5 frames, in the VAE's own space
    torch.testing.assert_close(wan21_to_dit_space(latent["samples"][:1, :, :2]),
                               VAECodec(toy_vae).encode_video(video[-5:]), rtol=1e-5, atol=1e-5)
    assert torch.equal(latent["samples"][:, :, 2:], torch.zeros(2, 16, 1, 8, 6))


@pytest.mark.parametrize("args,match", [((48, 64, 9, 9, 1), "overlap"), ((48, 64, 9, 4, 1), "4n\\+1"),
                                        ((64, 64, 9, 5, 1), "video"), ((48, 64, 10, 5, 1), "4n\\+1")])
def test_segment_latent_refuses_what_cannot_continue(nodes, toy_vae, args, match):
    pack, node = nodes
    vae = pack.nodes.bundle_models.BundleVAE(toy_vae)
    with pytest.raises(RefAlignInputError, match=match):
        node["RefAlignSegmentLatent"].execute(vae, torch.rand(9, 64, 48, 3), *args)


def test_join_segments_is_the_core_join(nodes):
    _, node = nodes
    g = torch.Generator().manual_seed(1)
    video, segment = torch.rand(9, 16, 16, 3, generator=g), torch.rand(9, 16, 16, 3, generator=g)
    for color_match in (False, True):
        joined = node["RefAlignJoinSegments"].execute(video, segment, 5, color_match).result[0]
        assert torch.equal(joined, join_segment(video, segment, 5, color_match))
    assert node["RefAlignJoinSegments"].execute(video, segment, 1, False).result[0].shape[0] == 17
