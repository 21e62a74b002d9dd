"""Transparent huge pages for XLA:CPU's per-call temporary buffers (Linux with glibc).

XLA:CPU allocates the temporaries of every call of a compiled program with malloc. glibc serves
a block above its mmap threshold (32 MiB at most, and always for a worker thread's block that
outgrows its arena) with a fresh `mmap` and returns it with `munmap` on free, so the kernel
zero-fills it again, one 4 KiB page fault at a time, on every call. The embedded default's
5-seed learn call maps 532 MB this way: ~145k minor page faults and ~0.3 CPU-seconds in the
kernel per step (BENCHMARKS.md, "Many seeds in one program"). With the glibc tunable
`glibc.malloc.hugetlb=1` (glibc >= 2.35) malloc asks for transparent huge pages on its mmaps
(`madvise(MADV_HUGEPAGE)`), i.e. one fault per 2 MiB. glibc reads tunables only when a process
starts, so `reexec_with_huge_pages()` re-executes the running command once with the tunable
added to `GLIBC_TUNABLES`; the command-line entry points call it first thing. Nothing changes
but where the pages come from: every result is bit for bit the same.

It does nothing where it cannot help: not Linux, not glibc or older than 2.35, transparent huge
pages set to `never` or already `always`, the tunable already set, or `RL_JAX_HUGE_PAGES=0`.
"""

from __future__ import annotations

import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb"
OPT_OUT = "RL_JAX_HUGE_PAGES"  # "0": never re-execute
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"


def _thp_mode(path: str = THP_MODE_FILE) -> str | None:
    """The bracketed choice of the kernel's THP setting ("always", "madvise", "never") or None."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else None


def _glibc_has_tunable() -> bool:
    name, version = platform.libc_ver()
    if name != "glibc":
        return False
    try:
        return tuple(int(x) for x in version.split(".")[:2]) >= (2, 35)
    except ValueError:
        return False


def huge_pages_env(environ=None, thp_mode: str | None = None) -> dict | None:
    """The environment to re-execute with, or None when re-executing would not help."""
    environ = dict(os.environ if environ is None else environ)
    tunables = environ.get("GLIBC_TUNABLES", "")
    if environ.get(OPT_OUT) == "0" or TUNABLE in tunables:
        return None
    if not sys.platform.startswith("linux") or not _glibc_has_tunable():
        return None
    if (thp_mode or _thp_mode()) != "madvise":
        return None
    environ["GLIBC_TUNABLES"] = ":".join(filter(None, [tunables, f"{TUNABLE}=1"]))
    return environ


def reexec_with_huge_pages() -> None:
    """Re-execute this process's command with `glibc.malloc.hugetlb=1` when that helps (see the
    module docstring); otherwise return. Call it before any work: the process is replaced."""
    env = huge_pages_env()
    if env is None or not sys.executable:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
