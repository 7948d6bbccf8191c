import json

import pytest
import torch
import skimage.data as skimage_data
import torch.nn.functional as F

from refalign_core.errors import RefAlignInputError
from refalign_core.toy.world import FPS, make_toy_world
from refalign_core.training.data import ReferenceAugmentation, SkipCounter, VideoInfo, load_video_clip, probe_video
from refalign_core.training.datasets import read_jsonl
from refalign_core.models.vfm import (IMAGENET_MEAN, IMAGENET_STD, DinoVFM, EfficientNetLite0VFM, _normalize,
                                      load_efficientnet_lite0)



@pytest.fixture(scope="module")
def effnet():
    return load_efficientnet_lite0()


def photo(name, size):
    image = torch.from_numpy(getattr(skimage_data, name)().copy()).permute(2, 0, 1).float()[None] / 255
    return F.interpolate(image, size=size, mode="bilinear", antialias=True)


def test_efficientnet_lite0_real_weights_recognise_real_photos(effnet):
    logits = effnet(_normalize(torch.cat([photo("chelsea", (224, 224)), photo("coffee", (224, 224))]),
                               IMAGENET_MEAN, IMAGENET_STD))
    top = logits.argmax(-1).tolist()
    assert 281 <= top[0] <= 285  # a cat class (tabby / tiger / Persian / Siamese / Egyptian cat)
    assert top[1] in (967, 968)  # espresso / cup


def test_efficientnet_tokens_sit_on_the_dit_reference_grid(effnet):
    vfm = EfficientNetLite0VFM(effnet)
    tokens = vfm(torch.cat([photo("chelsea", (96, 160)), photo("coffee", (96, 160))]))
    assert tokens.shape == (2, 6 * 10, 1392)
    same = F.cosine_similarity(vfm(photo("chelsea", (96, 160))).mean(1), vfm(photo("chelsea", (96, 160)).flip(-1)).mean(1))
    other = F.cosine_similarity(vfm(photo("chelsea", (96, 160))).mean(1), vfm(photo("coffee", (96, 160))).mean(1))
    assert same > other
    with pytest.raises(RefAlignInputError, match="multiple of 16"):
        vfm(torch.rand(1, 3, 40, 48))


@pytest.mark.parametrize("kind", ["dinov2", "dinov3"])
def test_dino_backends_from_a_local_folder(tmp_path, kind):
    import transformers
    if kind == "dinov2":
        model = transformers.Dinov2Model(transformers.Dinov2Config(
            hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, patch_size=14, image_size=56))
        prefix = 1
    else:
        model = transformers.DINOv3ViTModel(transformers.DINOv3ViTConfig(
            hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, patch_size=16,
            num_register_tokens=4, image_size=64))
        prefix = 5
    model.save_pretrained(tmp_path)
    vfm = DinoVFM.from_folder(tmp_path)
    assert vfm.num_prefix_tokens == prefix
    tokens = vfm(torch.rand(2, 3, 48, 64))
    assert tokens.shape == (2, 3 * 4, 32)
    with pytest.raises(RefAlignInputError, match="VFM"):
        DinoVFM.from_folder(tmp_path / "missing")


def test_manifest_skips_bad_lines_and_counts_them(tmp_path):
    (tmp_path / "m.jsonl").write_text("\n".join([
        json.dumps({"video": "a.mp4", "caption": "x", "references": [{"image": "r.png", "subject": "s"}]}),
        "{not json",
        json.dumps({"video": "b.mp4", "caption": "y", "references": []}),
        json.dumps({"caption": "no video", "references": [{"image": "r.png"}]}),
        json.dumps({"video": "../outside.mp4", "caption": "escapes", "references": [{"image": "r.png"}]}),
        json.dumps({"video": "c.mp4", "caption": "scene", "references": [{"image": "r.png"},
                                                                        {"image": "beach.jpg", "scene": True}]}),
    ]))
    skipped = SkipCounter()
    entries = read_jsonl(tmp_path / "m.jsonl", skipped)
    assert [e.video for e in entries] == [tmp_path / "a.mp4", tmp_path / "c.mp4"]
    assert entries[0].references[0].subject == "s" and entries[0].references[0].views[0].image == tmp_path / "r.png"
    assert [r.scene for r in entries[1].references] == [False, True]
    assert skipped.total == 4 and any("points outside" in reason for _, reason in skipped.entries)


def test_video_clip_sampling_resizes_crops_and_resamples(tmp_path):
    manifest = make_toy_world(tmp_path, num_videos=1, size=64, frames=17)
    video = read_jsonl(manifest, SkipCounter())[0].video
    assert probe_video(video) == VideoInfo(64, 64, float(FPS), 17)
    clip = load_video_clip(video, 5, FPS // 2, 32, 48, torch.Generator().manual_seed(0))
    assert clip.shape == (3, 5, 32, 48) and -1 <= clip.min() and clip.max() <= 1
    assert load_video_clip(video, 9, FPS // 2, 32, 32).shape[1] == 9  # 17 frames at 8 fps -> 9 at 4 fps
    with pytest.raises(RefAlignInputError, match="frames"):
        load_video_clip(video, 10, FPS // 2, 32, 32)
    # a frame range and a crop: frames 4..12 of the left half, upscaled; the same pixels as cutting by hand
    part = load_video_clip(video, 9, None, 64, 32, frame_range=(4, 13), crop=(0, 0, 32, 64))
    whole = load_video_clip(video, 17, None, 64, 64)
    torch.testing.assert_close(part, whole[:, 4:13, :, :32], atol=0.02, rtol=0)


def test_augmentation_fills_with_white_and_is_reproducible():
    image = torch.ones(2, 3, 64, 64)
    image[:, :, 16:48, 16:48] = torch.tensor([0.8, 0.1, 0.1]).view(1, 3, 1, 1)
    aug = ReferenceAugmentation()
    a = aug(image, torch.Generator().manual_seed(3))
    b = aug(image, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and not torch.allclose(a, image)
    corners = torch.stack([a[..., :4, :4].mean(), a[..., -4:, -4:].mean()])
    assert (corners > 0.8).all()  # background and uncovered area stay (near) white, never black
