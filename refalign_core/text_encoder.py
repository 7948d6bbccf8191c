"""umT5 text encoder (transformers `UMT5EncoderModel` + tokenizer) from a local folder, and prompt encoding the
way Wan2.1 does it: the prompt's tokens (with EOS), zero-padded to 512, or to the tokenizer's `model_max_length`
where a folder sets one below 512 (the toy model, whose captions are under 16 tokens, pads to 16)."""

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase, UMT5EncoderModel

from .errors import RefAlignInputError

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
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
        model = UMT5EncoderModel.from_pretrained(model_dir, local_files_only=True, use_safetensors=True, dtype=dtype)
    except (OSError, ValueError) as e:
        raise RefAlignInputError(f"text encoder: cannot load umT5 + tokenizer from {path}: {e}") from e
    return TextEncoder(tokenizer, model.to(device).eval().requires_grad_(False), padded_length(tokenizer))


def padded_length(tokenizer: PreTrainedTokenizerBase) -> int:
    """The tokenizer's `model_max_length` where it is set below 512, else Wan2.1's 512."""
    length = getattr(tokenizer, "model_max_length", None)
    return int(length) if isinstance(length, int) and 1 <= length < TEXT_LENGTH else TEXT_LENGTH


@torch.no_grad()
def encode_prompts(text_encoder: TextEncoder, prompts: list[str], max_length: int | None = None) -> torch.Tensor:
    """prompts -> `[B, max_length, dim]` fp32 embeddings (default length: the encoder's); positions past each
    prompt's tokens are exactly zero."""
    max_length = max_length or text_encoder.length
    device = next(text_encoder.model.parameters()).device
    tokens = text_encoder.tokenizer(
        list(prompts), padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
    ).to(device)
    hidden = text_encoder.model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
    return (hidden * tokens.attention_mask.unsqueeze(-1)).float().cpu()
