import json

import pytest
import torch
import skimage.data as skimage_data
import torch.nn.functional as F

from refalign_core.data import ReferenceAugmentation, SkipCounter, load_video_clip, read_manifest
from refalign_core.toy_world import make_toy_world
from refalign_core.errors import RefAlignInputError
from refalign_core.feature_cache import CacheSettings, FeatureCache, build_cache
from refalign_core.text_encoder import TextEncoder
from refalign_core.tiny import char_tokenizer, tiny_text_encoder
from refalign_core.training import make_training_batch
from refalign_core.vfm import IMAGENET_MEAN, IMAGENET_STD, DinoVFM, EfficientNetLite0VFM, _normalize, load_efficientnet_lite0



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
    ]))
    skipped = SkipCounter()
    entries = read_manifest(tmp_path / "m.jsonl", skipped)
    assert len(entries) == 1 and entries[0].video == tmp_path / "a.mp4" and entries[0].references[0].subject == "s"
    assert skipped.total == 3


def test_video_clip_sampling_resizes_crops_and_resamples(tmp_path):
    manifest = make_toy_world(tmp_path, num_videos=1, size=64, frames=17)
    video = read_manifest(manifest)[0].video
    clip = load_video_clip(video, 5, 8, 32, 48, torch.Generator().manual_seed(0))
    assert clip.shape == (3, 5, 32, 48) and -1 <= clip.min() and clip.max() <= 1
    assert load_video_clip(video, 9, 8, 32, 32).shape[1] == 9  # 17 frames at 16 fps -> 9 at 8 fps
    with pytest.raises(RefAlignInputError, match="frames"):
        load_video_clip(video, 10, 8, 32, 32)


def test_augmentation_fills_with_white_and_is_reproducible():
    image = torch.ones(2, 3, 64, 64)
    image[:, :, 16:48, 16:48] = torch.tensor([0.8, 0.1, 0.1]).view(1, 3, 1, 1)
    aug = ReferenceAugmentation()
    a = aug(image, torch.Generator().manual_seed(3))
    b = aug(image, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and not torch.allclose(a, image)
    corners = torch.stack([a[..., :4, :4].mean(), a[..., -4:, -4:].mean()])
    assert (corners > 0.8).all()  # background and uncovered area stay (near) white, never black


def test_cache_skips_missing_and_corrupt_videos_and_dropout_rates(tmp_path, vae):
    manifest = make_toy_world(tmp_path / "data", num_videos=4, size=32, frames=9, max_subjects=2)
    (tmp_path / "data" / "videos" / "00001.mp4").write_bytes(b"corrupt")
    (tmp_path / "data" / "videos" / "00002.mp4").unlink()
    k = len(read_manifest(manifest)[3].references)
    settings = CacheSettings(width=32, height=32, num_frames=5, fps=None, augment_copies=2)

    class TinyVFM(torch.nn.Module):
        def forward(self, images):
            return F.avg_pool2d(images, 16).flatten(2).transpose(1, 2)

    build_cache(manifest, tmp_path / "cache", settings, vae, TextEncoder(char_tokenizer(), tiny_text_encoder()),
                TinyVFM(), progress=False)
    cache = FeatureCache(tmp_path / "cache")
    assert len(cache) == 2 and cache.info["skipped"] == 2 and cache.vfm_dim == 3
    sample = cache[1]
    assert sample["reference_latents"].shape == (2, k, 16, 4, 4) and sample["vfm_tokens"].shape == (2, k * 4, 3)
    counts = {"text": 0, "refs": 0, "both": 0, "none": 0}
    for seed in range(2000):
        batch = make_training_batch(sample, cache.null_prompt, torch.Generator().manual_seed(seed))
        assert batch.text.shape[1] == 512
        n = cache.null_prompt.shape[0]
        no_text = torch.equal(batch.text[0, :n], cache.null_prompt) and batch.text[0, n:].abs().max() == 0
        no_refs = batch.keep_references.item() == 0
        counts["both" if no_text and no_refs else "text" if no_text else "refs" if no_refs else "none"] += 1
        if no_refs:
            assert batch.references.shape[2] == 1 and batch.references.abs().max() == 0
    assert all(150 < counts[k] < 250 for k in ("text", "refs", "both")), counts
