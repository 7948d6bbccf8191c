"""The toy world's text encoder: a small random umT5 over a word-level tokenizer of the world's closed vocabulary
(`world.vocabulary()`); `train/make_toy_bundle.py` builds and ships it."""

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from tokenizers.processors import TemplateProcessing
from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel


def word_tokenizer(words) -> PreTrainedTokenizerFast:
    """A T5-style tokenizer whose tokens are whole words of a closed vocabulary (the toy world's captions)."""
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2} | {w: i + 3 for i, w in enumerate(sorted(set(words)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


SHORT_TEXT = dict(relative_attention_num_buckets=8, relative_attention_max_distance=16)  # captions of a few words


def umt5_encoder(seed: int, vocab_size: int, **config) -> UMT5EncoderModel:
    """A random umT5 encoder seeded with `seed`; `config`: UMT5Config fields over `SHORT_TEXT`."""
    torch.manual_seed(seed)
    return UMT5EncoderModel(UMT5Config(vocab_size=vocab_size, **{**SHORT_TEXT, **config})).eval()
