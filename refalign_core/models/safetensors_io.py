"""Reading and writing weight files: safetensors only, pickles refused, writes atomic."""

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..errors import RefAlignInputError
from ..files import write_atomic
from ..paths import inside

_PICKLE_MAGIC = (b"PK\x03\x04", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


def _refuse_pickle(path: Path, what: str) -> None:
    with open(path, "rb") as f:
        head = f.read(8)
    if head.startswith(_PICKLE_MAGIC) or path.suffix in {".pt", ".pth", ".ckpt", ".bin", ".pkl"}:
        raise RefAlignInputError(
            f"{what}: {path} is a pickle / PyTorch checkpoint, which is never loaded (it can run code). "
            "Convert it to .safetensors first."
        )


def _shard_files(path: Path, what: str) -> list[Path]:
    """A .safetensors file, a *.safetensors.index.json, or a folder holding one of them."""
    if not path.exists():
        raise RefAlignInputError(f"{what}: {path} does not exist")
    if path.is_dir():
        indexes = sorted(path.glob("*.safetensors.index.json"))
        files = sorted(path.glob("*.safetensors"))
        if len(indexes) == 1:
            path = indexes[0]
        elif len(files) == 1:
            return files
        else:
            raise RefAlignInputError(
                f"{what}: folder {path} must hold exactly one .safetensors file or one *.safetensors.index.json, "
                f"found {[p.name for p in files + indexes]}"
            )
    if path.name.endswith(".index.json"):
        try:
            weight_map = json.loads(path.read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise RefAlignInputError(f"{what}: {path} is not a safetensors index (no weight_map): {e}") from e
        return [inside(path.parent, name, f"{what}: {path} shard") for name in names]
    return [path]


def _read(path: str | os.PathLike, what: str, take) -> tuple[dict[str, torch.Tensor], dict]:
    tensors: dict[str, torch.Tensor] = {}
    metadata: dict = {}
    for file in _shard_files(Path(path), what):
        if not file.is_file():
            raise RefAlignInputError(f"{what}: shard {file} is missing")
        _refuse_pickle(file, what)
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                metadata.update(f.metadata() or {})
                for key in f.keys():
                    tensors[key] = take(f, key)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise RefAlignInputError(
                f"{what}: {file} is not a readable safetensors file (truncated or corrupt?): {e}"
            ) from e
    return tensors, metadata


def read_safetensors(path: str | os.PathLike, what: str = "checkpoint") -> tuple[dict[str, torch.Tensor], dict]:
    """Load all tensors (CPU, stored dtype) and the header metadata of one file or a sharded set."""
    return _read(path, what, lambda f, key: f.get_tensor(key))


def read_safetensors_shapes(path: str | os.PathLike, what: str = "checkpoint") -> tuple[dict[str, torch.Tensor], dict]:
    """Like `read_safetensors`, but every tensor is an empty meta tensor of its stored shape: the header only, no
    weights read (checks before expensive work)."""
    return _read(path, what, lambda f, key: torch.empty(f.get_slice(key).get_shape(), device="meta"))


def write_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict | None = None) -> None:
    """Write atomically (`files.write_atomic`): a crash or a full disk never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}

    def write(tmp: Path) -> None:
        try:
            save_file(tensors, tmp, metadata=metadata)
        except SafetensorError as e:  # the file system failed (a full disk): report it as one
            raise OSError(f"{path}: cannot be written: {e}") from e

    write_atomic(path, write)
