"""Issue 35: files written by runs and experiments appear whole, even with two writers at once
(two `python -m experiments.bandit` on one --out used to leave a torn bandit.png)."""

import os
import threading

import pytest

from rl_jax import atomic


def test_concurrent_writers_and_a_reader_only_ever_see_whole_files(tmp_path):
    path = tmp_path / "summary.md"
    texts = ["a" * 2**20, "b" * 2**19]
    atomic.write_text(path, texts[0])

    def write(text):
        for _ in range(30):
            atomic.write_text(path, text)

    writers = [threading.Thread(target=write, args=(t,)) for t in texts]
    for w in writers:
        w.start()
    seen = set()
    while any(w.is_alive() for w in writers):
        seen.add(path.read_text())
    for w in writers:
        w.join()
    assert seen <= set(texts)
    assert os.listdir(tmp_path) == ["summary.md"]  # no temporary file left behind


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "figure.png"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic.replacing(path) as tmp:
        assert tmp.suffix == ".png" and tmp.parent == tmp_path  # savefig infers the format
        tmp.write_bytes(b"half")
        raise RuntimeError("the plot failed")
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["figure.png"]
