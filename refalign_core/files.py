"""Files that are either whole or absent, and one writer per output.

Every "is this done?" decision in the project reads a file written by `write_atomic`: the bytes go to a temp file in
the same folder (`.<name>.<pid>-<random>.tmp`: hidden, unique per process, never a finished name), are flushed to
disk, and the temp is renamed over the final name; the folder entry is flushed too. A kill or a full disk leaves at
most a temp file, which `is_temp` recognises and `remove_stale_temps` deletes once no writer can own it.

`OutputLock` is an exclusive lock (an OS file lock on `<folder>/.lock` or `.<file>.lock`): a second writer gets one
clear error, a finished writer removes its lock file, and a killed writer's lock goes with its process, so nothing
needs deleting by hand."""

import os
import secrets
from collections.abc import Callable
from pathlib import Path

from .errors import RefAlignInputError

TEMP_SUFFIX = ".tmp"


def temp_path(path: Path) -> Path:
    """A fresh temp name beside `path` for this process."""
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}{TEMP_SUFFIX}")


def is_temp(name: str) -> bool:
    return name.startswith(".") and name.endswith(TEMP_SUFFIX)


def _fsync_folder(folder: Path) -> None:
    if os.name == "posix":
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_atomic(path: str | os.PathLike, data: bytes | str | Callable[[Path], None]) -> Path:
    """Write `data` (bytes, text, or a function that writes the file it is given) to `path` whole or not at all."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        if callable(data):
            data(tmp)
        else:
            tmp.write_bytes(data.encode() if isinstance(data, str) else data)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_folder(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def remove_stale_temps(folder: Path) -> int:
    """Delete temp files left in `folder` by writers that were killed (those of live processes on this machine are
    kept). Returns how many were deleted."""
    removed = 0
    for path in folder.iterdir() if folder.is_dir() else ():
        if not is_temp(path.name):
            continue
        pid = path.name.rsplit(".", 2)[-2].split("-")[0]
        if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
            continue
        path.unlink(missing_ok=True)
        removed += 1
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class OutputLock:
    """`with OutputLock(target, what):` — exclusive use of an output folder (`folder=True` or an existing folder:
    the lock file `name` inside it) or of a file (a lock file beside it). Raises RefAlignInputError naming `what`
    when another process holds it."""

    def __init__(self, target: str | os.PathLike, what: str, folder: bool = False, name: str = ".lock"):
        target = Path(target)
        self.path = target / name if folder or target.is_dir() else target.with_name(f".{target.name}.lock")
        self.target, self.what, self.file = target, what, None

    def __enter__(self) -> "OutputLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            self.file = open(self.path, "a+")
            try:
                _lock(self.file)
            except OSError:
                self.file.seek(0)
                holder = self.file.read().strip() or "another process"
                self.file.close()
                raise RefAlignInputError(f"{self.what}: {self.target} is being written by {holder}; wait for it to "
                                         "finish or choose another output") from None
            if _same_file(self.file, self.path):
                break
            self.file.close()  # its holder removed that lock file as it finished: lock the current one
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"process {os.getpid()}")
        self.file.flush()
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.path.unlink(missing_ok=True)  # while still locked: a writer waiting on this file re-checks the path
        except OSError:  # Windows cannot remove an open file; the lock file stays, unlocked
            pass
        self.file.close()


def _same_file(file, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(file.fileno()), os.stat(path))
    except FileNotFoundError:
        return False


def _lock(file) -> None:
    if os.name == "nt":
        import msvcrt
        msvcrt.locking(file.fileno(), msvcrt.LK_NBLCK, 1)
    else:
        import fcntl
        fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)

