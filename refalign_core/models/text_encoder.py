"""umT5 text encoder (transformers `UMT5EncoderModel` + tokenizer) from a local folder, and prompt encoding the
way Wan2.1 does it: the prompt's tokens (with EOS), zero-padded to 512, or to the tokenizer's `model_max_length`
where a folder sets one below 512 (the toy model, whose captions are under 16 tokens, pads to 16)."""

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase, UMT5Config, UMT5EncoderModel

from ..errors import RefAlignInputError

try:
    from huggingface_hub.errors import StrictDataclassError
except ImportError:  # a huggingface_hub without validated configs: its errors are the TypeError / ValueError below
    StrictDataclassError = TypeError

logger = logging.getLogger(__name__)

TEXT_LENGTH = 512

# The standard Wan2.1 negative prompt (the official RefAlign inference scripts use it unchanged).
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，"
    "丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，"
    "静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)


@dataclass
class TextEncoder:
    tokenizer: PreTrainedTokenizerBase
    model: UMT5EncoderModel
    length: int = TEXT_LENGTH  # prompts are zero-padded to this many tokens (the DiT was trained so)

    @property
    def dim(self) -> int:
        return self.model.config.d_model


def _layout(path: Path) -> tuple[Path, Path]:
    """(model dir, tokenizer dir): a folder with both, or a diffusers pipeline folder (text_encoder/, tokenizer/)."""
    if (path / "text_encoder" / "config.json").is_file():
        return path / "text_encoder", path / "tokenizer" if (path / "tokenizer").is_dir() else path
    if (path / "config.json").is_file():
        return path, path
    raise RefAlignInputError(
        f"text encoder: {path} must be a folder with an umT5 config.json + model.safetensors + tokenizer files, "
        "or a diffusers pipeline folder with text_encoder/ and tokenizer/"
    )


def load_text_encoder(path: str | os.PathLike, *, dtype=torch.float32, device="cpu") -> TextEncoder:
    path = Path(path)
    if not path.is_dir():
        raise RefAlignInputError(f"text encoder: {path} is not a folder")
    model_dir, tokenizer_dir = _layout(path)
    try:
        config = UMT5Config.from_pretrained(model_dir, local_files_only=True)
        with torch.device("meta"):
            UMT5EncoderModel(config)
    except (OSError, ValueError, TypeError, KeyError, StrictDataclassError) as e:
        raise RefAlignInputError(f"text encoder: {model_dir / 'config.json'} is not a umT5 config: "
                                 f"{type(e).__name__}: {e}") from e
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
        model = UMT5EncoderModel.from_pretrained(model_dir, config=config, local_files_only=True,
                                                 use_safetensors=True, dtype=dtype)
    except (OSError, ValueError) as e:
        raise RefAlignInputError(f"text encoder: cannot load umT5 + tokenizer from {path}: {e}") from e
    return TextEncoder(tokenizer, model.to(device).eval().requires_grad_(False), padded_length(tokenizer))


def padded_length(tokenizer: PreTrainedTokenizerBase) -> int:
    """The tokenizer's `model_max_length` where it is set below 512, else Wan2.1's 512."""
    length = getattr(tokenizer, "model_max_length", None)
    return int(length) if isinstance(length, int) and 1 <= length < TEXT_LENGTH else TEXT_LENGTH


def check_prompt_text(text, what: str = "prompt") -> str:
    """A prompt must be text that UTF-8 can hold (a command line's undecodable bytes arrive as lone surrogates)."""
    if not isinstance(text, str):
        raise RefAlignInputError(f"{what}: expected text, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = text[e.start].encode("utf-8", "surrogateescape")
        raise RefAlignInputError(f"{what}: not valid UTF-8 (byte {bad!r} at character {e.start})") from None
    return text


def unknown_words(tokenizer: PreTrainedTokenizerBase, text: str) -> list[str]:
    """The words of `text` the tokenizer turns into its unknown token (empty for tokenizers without one)."""
    unk = tokenizer.unk_token_id
    if unk is None or not tokenizer.is_fast:
        return []
    tokens = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    words = [text[start:end] for token, (start, end) in zip(tokens.input_ids, tokens.offset_mapping) if token == unk]
    return list(dict.fromkeys(words))


@torch.no_grad()
def encode_prompts(text_encoder: TextEncoder, prompts: list[str], max_length: int | None = None) -> torch.Tensor:
    """prompts -> `[B, max_length, dim]` fp32 embeddings (default length: the encoder's); positions past each
    prompt's tokens are exactly zero. Words the tokenizer does not know are named in a warning."""
    for text in prompts:
        unknown = unknown_words(text_encoder.tokenizer, check_prompt_text(text))
        if unknown:
            logger.warning("prompt %r: the tokenizer does not know %d word(s), which become its unknown token: %s",
                           text[:80], len(unknown), ", ".join(unknown[:12]))
    max_length = max_length or text_encoder.length
    device = next(text_encoder.model.parameters()).device
    tokens = text_encoder.tokenizer(
        list(prompts), padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
    ).to(device)
    hidden = text_encoder.model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
    return (hidden * tokens.attention_mask.unsqueeze(-1)).float().cpu()
