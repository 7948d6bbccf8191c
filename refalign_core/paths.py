"""Paths named inside a file (a bundle's JSON, a sharded checkpoint's index, a dataset manifest, eval cases) resolve
inside that file's folder; an absolute path is the user's own choice, and a relative one that climbs out (`..`) is
refused."""

import os
import tempfile
from pathlib import Path

from .errors import RefAlignInputError


def inside(folder: Path, relative, what: str) -> Path:
    """`relative` resolved inside `folder` (absolute: as given)."""
    if not isinstance(relative, str) or not relative:
        raise RefAlignInputError(f"{what}: expected a path, got {relative!r}")
    path = Path(relative)
    if path.is_absolute():
        return path
    if not (folder / path).resolve().is_relative_to(Path(folder).resolve()):
        raise RefAlignInputError(f"{what}: {relative} points outside {folder}")
    return folder / path


def check_output_folder(folder: Path, what: str) -> None:
    """Refuse, before any work, an output folder that cannot be created or written (a file in its place, a
    read-only parent, a file system that refuses new folders); a temp folder is made and removed in the deepest part
    of it that exists."""
    folder = Path(folder)
    existing = next(p for p in (folder, *folder.absolute().parents) if p.exists())  # "/" at the latest
    if not existing.is_dir():
        raise RefAlignInputError(f"{what}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise RefAlignInputError(f"{what}: {existing} is not writable")
    try:  # proof, leaving nothing behind: /proc/x passes the permission checks and fails only here
        os.rmdir(tempfile.mkdtemp(prefix=".refalign-probe-", dir=existing))
    except OSError as e:
        raise RefAlignInputError(f"{what}: {folder} cannot be created or written ({e.strerror})") from None
