"""Tiny random models and bundles for tests, benchmarks and the demo (built in-process, no downloads)."""

import string
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from tokenizers.processors import TemplateProcessing
from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

from ..transformer_refalign import RefAlignTransformer3DModel

TINY_DIT = dict(num_attention_heads=2, attention_head_dim=16, in_channels=16, out_channels=16, text_dim=32,
                freq_dim=32, ffn_dim=64, num_layers=3)
TINY_VAE = dict(base_dim=8, z_dim=16)
TINY_UMT5 = dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
                 relative_attention_max_distance=16)
TOKEN_CHARS = string.ascii_lowercase + string.digits + " .,'-!?"


def tiny_dit(seed: int = 0, **overrides) -> RefAlignTransformer3DModel:
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


def word_tokenizer(words) -> PreTrainedTokenizerFast:
    """A T5-style tokenizer whose tokens are whole words of a closed vocabulary (the toy world's captions)."""
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2} | {w: i + 3 for i, w in enumerate(sorted(set(words)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def tiny_text_encoder(seed: int = 0, vocab_size: int = 64, **overrides) -> UMT5EncoderModel:
    torch.manual_seed(seed)
    return UMT5EncoderModel(UMT5Config(vocab_size=vocab_size, **{**TINY_UMT5, **overrides})).eval()


def write_tiny_text_encoder(folder: str | Path, seed: int = 0) -> Path:
    folder = Path(folder)
    tiny_text_encoder(seed).save_pretrained(folder, safe_serialization=True)
    char_tokenizer().save_pretrained(folder)
    return folder
