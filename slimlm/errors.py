"""The one exception type that the CLI turns into a clear one-line message, and the one place where
the exceptions of reading, parsing and writing files become it: naming the file, what is wrong with it
and what to do. The original exception stays chained (`raise ... from`), so `--debug` / SLIMLM_DEBUG=1
shows where it came from."""
from __future__ import annotations

import errno
import os
from contextlib import contextmanager


class SlimlmError(Exception):
    """A problem with the user's input or environment: printed as one line, no traceback."""


def debug_wanted() -> bool:
    """SLIMLM_DEBUG=1 (or `slimlm --debug`, which sets it): show tracebacks instead of one line."""
    return os.environ.get("SLIMLM_DEBUG", "") not in ("", "0")


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# what to do when the operating system refuses a write, by errno
_WRITE_ADVICE = {
    errno.ENOSPC: "no space left on the device: free space or choose a folder on another disk",
    errno.EDQUOT: "disk quota exceeded: free space or choose another folder",
    errno.EROFS: "the file system is read-only: choose another folder",
    errno.EACCES: "permission denied: choose a folder you can write to",
    errno.EPERM: "permission denied: choose a folder you can write to",
    errno.ENOENT: "its folder does not exist: create it first or choose another path",
    errno.ENOTDIR: "part of the path is a file, not a folder: choose another path",
    errno.EISDIR: "it is a folder: give a file name",
    errno.ENAMETOOLONG: "the name is too long: choose a shorter one",
}


def write_failure(err: OSError, path) -> SlimlmError:
    advice = _WRITE_ADVICE.get(err.errno, f"{first_line(err)}: check the folder or choose another")
    return SlimlmError(f"could not write {path}: {advice}")


def os_failure(err: OSError) -> SlimlmError:
    """An OSError that reached the command line without a reader or writer around it: its file and advice."""
    if isinstance(err, FileNotFoundError):
        return SlimlmError(f"{err.filename} not found: check the path")
    return SlimlmError(f"{err.filename}: {_WRITE_ADVICE.get(err.errno, first_line(err))}")


def read_failure(err: BaseException, path, what: str, fix: str) -> SlimlmError:
    if isinstance(err, FileNotFoundError):
        return SlimlmError(f"{what} {path} not found: {fix}")
    if isinstance(err, IsADirectoryError):
        return SlimlmError(f"{what} {path} is a folder, not a file")
    if isinstance(err, PermissionError):
        return SlimlmError(f"cannot read {what} {path}: permission denied (check its permissions)")
    if isinstance(err, UnicodeDecodeError):
        return SlimlmError(f"{what} {path} is not UTF-8 text (byte {err.start}): save it as UTF-8")
    if isinstance(err, OSError):
        return SlimlmError(f"cannot read {what} {path}: {first_line(err)}")
    return SlimlmError(f"{what} {path} is damaged or not what slimlm expects ({first_line(err)}): {fix}")


@contextmanager
def reading(path, what: str = "file", fix: str = "copy or download it again"):
    """Around code that reads and parses one file: any failure (missing, unreadable, truncated, wrong
    shape) becomes one line naming the file and `fix`. Errors that already explain themselves pass."""
    try:
        yield
    except (SlimlmError, KeyboardInterrupt):
        raise
    except Exception as err:  # a damaged file can fail in any parser: the file is the culprit
        raise read_failure(err, path, what, fix) from err


@contextmanager
def writing(path):
    """Around code that writes `path`: a full disk, a read-only or missing folder become one line."""
    try:
        yield
    except OSError as err:
        raise write_failure(err, path) from err
