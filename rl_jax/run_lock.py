"""One run owns its directory: an advisory lock on `<out_dir>/.lock`, held for the run's life.

The lock is `fcntl.flock` on a file in the run directory. The kernel releases it when the process
exits, however it exits (SIGKILL and the OOM killer included), so a stale lock never blocks a
rerun; a process that ends normally removes the file as it lets go, so nothing is left behind. The holder writes its PID, host and start time into the file; a second process on the
same directory reads them and is refused with `RunLockedError` (exit 2) before it writes
anything: it creates the directory at most, when it did not exist yet.

A multi-host job is one run whose processes share the directory by design: only its first
process takes the lock, and the others learn from it whether it got it (`hold_runs`).

`exclusive` is the blocking form, for caches that several runs may fill at once (the TFDS
preparation, the warm-start policy): the second process waits for the first and then finds the
result ready.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import os
import pathlib
import socket
import time

LOCK_FILE = ".lock"


class RunLockedError(ValueError):
    """Another process holds the run directory; the message names it."""


def _open_locked(path: pathlib.Path, blocking: bool) -> int | None:
    """A descriptor of `path` holding its flock, or None (non-blocking, held elsewhere).

    The lock must be on the file that `path` names when it is granted: a holder that removed
    the directory meanwhile (`run_dir.remove_if_no_output`) is detected by comparing inodes.
    """
    while True:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except FileNotFoundError:  # the directory was removed between mkdir and open
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except OSError as error:
            os.close(fd)
            if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return None
            raise
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def _holder(path: pathlib.Path, wait_s: float = 2.0) -> str:
    """The holder's line. It writes it just after taking the lock, so an empty file is read
    again for up to `wait_s` seconds before the holder is called unnamed."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            text = path.read_text().strip()
        except OSError:
            text = ""
        if text or time.monotonic() >= deadline:
            return text or "a process that has not written its name yet"
        time.sleep(0.02)


@contextlib.contextmanager
def hold(out_dir: str | os.PathLike):
    """Holds `<out_dir>/.lock` for the block (creating out_dir if needed); RunLockedError if
    another process holds it."""
    path = pathlib.Path(out_dir) / LOCK_FILE
    fd = _open_locked(path, blocking=False)
    if fd is None:
        raise RunLockedError(
            f"{out_dir} is in use by another run ({_holder(path)}); wait for it to finish, "
            "or pass another --out"
        )
    try:
        started = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"PID {os.getpid()} on {socket.gethostname()}, since {started}\n".encode(), 0)
        yield
    finally:
        _release(path, fd)


def _release(path: pathlib.Path, fd: int) -> None:
    """Removes the lock file while still holding it, then releases it: a process waiting on the
    removed file sees that it is gone (`_open_locked`) and locks a new one."""
    with contextlib.suppress(FileNotFoundError):
        if os.stat(path).st_ino == os.fstat(fd).st_ino:
            os.unlink(path)
    os.close(fd)


@contextlib.contextmanager
def hold_runs(out_dirs, primary: bool = True, process_count: int = 1):
    """Holds every directory of `out_dirs` for the block (see `hold`).

    In a job of several processes only the first (`primary`) locks; it tells the others whether
    it could, so that all of them stop, or none (a collective: every process must call it).
    """
    with contextlib.ExitStack() as stack:
        refusal = ""
        if primary:
            try:
                for out in out_dirs:
                    stack.enter_context(hold(out))
            except RunLockedError as error:
                refusal = str(error)
        if process_count > 1:
            refusal = _from_first_process(refusal)
        if refusal:
            raise RunLockedError(refusal)
        yield


def _from_first_process(text: str, size: int = 1024) -> str:
    """Process 0's `text` on every process (UTF-8, at most `size` bytes)."""
    import numpy as np
    from jax.experimental import multihost_utils

    data = np.zeros(size, np.uint8)
    encoded = text.encode()[:size]
    data[: len(encoded)] = np.frombuffer(encoded, np.uint8)
    data = np.asarray(multihost_utils.broadcast_one_to_all(data))
    return bytes(data).rstrip(b"\0").decode(errors="replace")


@contextlib.contextmanager
def exclusive(path: str | os.PathLike):
    """Holds the lock file `path` for the block, waiting while another process holds it."""
    path = pathlib.Path(path).expanduser()
    fd = _open_locked(path, blocking=True)
    try:
        yield
    finally:
        _release(path, fd)
