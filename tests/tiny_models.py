"""Tiny random models and bundles for tests, benchmarks and tools (built in-process, no downloads). Benchmarks and
tools reach this file by putting `tests/` on `sys.path`."""

import string
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from tokenizers.processors import TemplateProcessing
from transformers import PreTrainedTokenizerFast

from refalign_core.inference.pipeline import RefAlignPipeline
from refalign_core.models.text_encoder import load_text_encoder
from refalign_core.toy.demo import DEMO_SETTINGS
from refalign_core.toy.text_model import umt5_encoder
from refalign_core.toy.world import FPS
from refalign_core.models.transformer_refalign import RefAlignTransformer3DModel

TINY_DIT = dict(num_attention_heads=2, attention_head_dim=16, in_channels=16, out_channels=16, text_dim=32,
                freq_dim=32, ffn_dim=64, num_layers=3)
TINY_VAE = dict(base_dim=8, z_dim=16)
TINY_UMT5 = dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
TOKEN_CHARS = string.ascii_lowercase + string.digits + " .,'-!?"


def tiny_dit(seed: int = 0, **overrides) -> RefAlignTransformer3DModel:
    """A random DiT: `TINY_DIT` with `overrides` (pass a whole config for other shapes)."""
    torch.manual_seed(seed)
    return RefAlignTransformer3DModel(**{**TINY_DIT, **overrides}).eval()


def tiny_vae(seed: int = 0) -> AutoencoderKLWan:
    torch.manual_seed(seed)
    return AutoencoderKLWan(**TINY_VAE).eval()


def char_tokenizer() -> PreTrainedTokenizerFast:
    """A T5-style (Unigram, metaspace, `</s>` appended, `<pad>` = 0) tokenizer over single characters."""
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -1.0)] + [(c, -2.0) for c in TOKEN_CHARS]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def tiny_text_encoder(seed: int = 0, vocab_size: int = 64, **overrides):
    return umt5_encoder(seed, vocab_size, **{**TINY_UMT5, **overrides})


def write_tiny_text_encoder(folder: str | Path, seed: int = 0) -> Path:
    folder = Path(folder)
    tiny_text_encoder(seed).save_pretrained(folder, safe_serialization=True)
    char_tokenizer().save_pretrained(folder)
    return folder


def build_random_bundle(folder: Path) -> Path:
    """An untrained bundle (tiny DiT, VAE and umT5, seed 0) with the demo's settings, written to `folder`."""
    write_tiny_text_encoder(folder / "text_encoder")
    pipe = RefAlignPipeline(dit=tiny_dit(), vae=tiny_vae(), text_encoder=load_text_encoder(folder / "text_encoder"),
                            settings=DEMO_SETTINGS, fps=FPS)
    return pipe.save_bundle(folder)
