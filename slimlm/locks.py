"""One run per output: a lock file beside the output folder (`.NAME.lock`), held from the first check of
the output until the command ends, so that two runs never write one output (or its checkpoint folder).

flock locks belong to the open file, so a killed run's lock is released by the kernel; the file itself is
removed when the command ends. Under torchrun only rank 0 locks (every rank works for one run)."""
from __future__ import annotations

import atexit
import fcntl
import os
from pathlib import Path

from .errors import SlimlmError

_held: dict[Path, int] = {}  # lock file -> open descriptor


def lock_path(output: Path) -> Path:
    return output.with_name(f".{output.name}.lock")


def claim(output: Path) -> bool:
    """Hold the lock of `output` for this process, or say which run holds it. False on the ranks
    other than 0 under torchrun (rank 0 holds it for the run)."""
    if os.environ.get("RANK", "0") != "0":
        return False
    path = lock_path(Path(output).absolute())
    if path in _held:
        return True
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise SlimlmError(f"another slimlm run (process {holder}) is writing {output}: wait for it to finish "
                              "or choose another --output") from None
        try:  # the holder before us may have removed the file after we opened it: lock the file that is there
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    if not _held:  # jobs called from Python (not the command line) release at exit
        atexit.register(release_all)
    _held[path] = fd
    return True


def release_all() -> None:
    """Remove and release every lock this process holds (the command line calls this when a command ends)."""
    for path, fd in list(_held.items()):
        try:
            path.unlink(missing_ok=True)
        finally:
            os.close(fd)
            del _held[path]
