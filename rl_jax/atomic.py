"""Atomic file writes: every file a run or an experiment writes appears whole or not at all.

A file is written to a temporary file of a name no other process uses (`tempfile.mkstemp` in the
same directory, so `os.replace` is a rename within one file system), flushed to the disk and
renamed over the target. A reader (or a second process writing the same file) sees the old file
or the new one, never a mix; a process killed mid-write leaves at most a stray `.<name>.*.tmp`.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import tempfile


@contextlib.contextmanager
def replacing(path: str | os.PathLike):
    """Yields a temporary path beside `path` (same suffix, so `savefig` infers the format);
    when the block ends without error the file written there replaces `path` atomically."""
    path = pathlib.Path(path)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent
    )
    os.close(fd)
    try:
        yield pathlib.Path(tmp)
        with open(tmp, "rb+") as file:
            os.fsync(file.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would hide the file from other users
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    """Writes `text` to `path` atomically (see the module docstring)."""
    with replacing(path) as tmp:
        tmp.write_text(text)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
