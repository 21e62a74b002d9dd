"""`rl_jax.host_memory`: when the entry points re-execute with glibc's huge-page tunable."""

import os
import subprocess
import sys

import pytest

from rl_jax import host_memory


@pytest.fixture
def linux_glibc(monkeypatch):
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(host_memory, "_glibc_has_tunable", lambda: True)


def test_tunable_added_only_where_it_helps(linux_glibc):
    env = host_memory.huge_pages_env({"PATH": "/bin"}, thp_mode="madvise")
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    kept = host_memory.huge_pages_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, "madvise")
    assert kept["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    for mode in ("always", "never"):  # THP already on every mapping, or off
        assert host_memory.huge_pages_env({}, thp_mode=mode) is None
    assert host_memory.huge_pages_env({"RL_JAX_HUGE_PAGES": "0"}, "madvise") is None
    assert (
        host_memory.huge_pages_env({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "madvise") is None
    )


def test_not_linux_or_old_glibc(monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    assert host_memory.huge_pages_env({}, thp_mode="madvise") is None
    monkeypatch.setattr(sys, "platform", "linux")
    for libc, gains in (
        (("glibc", "2.31"), False),
        (("glibc", "2.35"), True),
        (("musl", "1.2"), False),
    ):
        monkeypatch.setattr(host_memory.platform, "libc_ver", lambda libc=libc: libc)
        env = host_memory.huge_pages_env({}, thp_mode="madvise")
        assert env == ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"} if gains else None), libc


def test_thp_mode_reads_the_bracketed_choice(tmp_path):
    path = tmp_path / "enabled"
    path.write_text("always [madvise] never\n")
    assert host_memory._thp_mode(str(path)) == "madvise"
    assert host_memory._thp_mode(str(tmp_path / "missing")) is None


def test_reexec_runs_the_command_once_more_with_the_tunable():
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "RL_JAX_HUGE_PAGES")}
    if host_memory.huge_pages_env(env) is None:
        pytest.skip("this machine gains nothing from the tunable (not Linux/glibc >= 2.35/madvise)")
    code = (
        "import os, sys; print('start', flush=True); from rl_jax import host_memory; "
        "host_memory.reexec_with_huge_pages(); print(os.environ['GLIBC_TUNABLES'], sys.argv[1:])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, "arg"], env=env, capture_output=True, text=True, check=True
    ).stdout.split("\n")
    assert out[:3] == ["start", "start", "glibc.malloc.hugetlb=1 ['arg']"]
