"""SIGTERM and SIGINT stop a run at a step boundary, after a checkpoint of the last finished step.

Preemptible machines (TPU VMs, spot GPUs) get a SIGTERM and a grace period of typically 30 s.
Inside `watch()` the first SIGTERM or SIGINT only records the signal; the training loop asks
`Watch.should_stop()` between steps, finishes the step in hand, saves it and raises `Preempted`
(a `SystemExit` with status 143 for SIGTERM, 130 for SIGINT: 128 + the signal number, the shell's
convention). A second signal ends the process at once with the same status: the checkpoint being
written is abandoned in its temporary directory and the previous one stays the newest complete
one (`rl_jax.checkpoint`). The second signal is acted on by a thread reading the interpreter's
wakeup descriptor, so it works while the main thread is inside a long XLA call, where Python
signal handlers cannot run.

In a job of several processes the signal may reach them at different moments (or only one of
them): `should_stop` is then a collective that every process calls once per step, and all of
them stop after the same step if any of them was signalled.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(SystemExit):
    """The run stopped on a signal after saving its last finished step; `code` = 128 + signum."""

    def __init__(self, signum: int, message: str):
        super().__init__(128 + signum)
        self.signum = signum
        self.message = message


class Watch:
    """What `watch()` yields: the signal received (if any) and the per-step agreement."""

    def __init__(self, process_count: int = 1):
        self.signum: int | None = None
        self.process_count = process_count

    def _record(self, signum, frame=None) -> None:
        if self.signum is None:
            self.signum = signum

    def should_stop(self) -> bool:
        """Whether to stop before the next step: this process (or, in a multi-process job, any
        process) received a signal. A collective when there are several processes."""
        if self.process_count == 1:
            return self.signum is not None
        import numpy as np
        from jax.experimental import multihost_utils

        mine = np.int32(self.signum or 0)
        every = np.asarray(multihost_utils.process_allgather(mine))
        if self.signum is None and every.max() > 0:
            self.signum = int(every.max())
        return bool(every.max() > 0)


@contextlib.contextmanager
def watch(process_count: int = 1):
    """Records SIGTERM / SIGINT in the yielded `Watch` for the block (module docstring).

    Outside the main thread signal handlers cannot be installed: the block then runs unwatched.
    """
    state = Watch(process_count)
    if threading.current_thread() is not threading.main_thread():
        yield state
        return
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    previous = {signum: signal.signal(signum, state._record) for signum in SIGNALS}
    previous_wakeup = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    thread = threading.Thread(target=_count_signals, args=(read_fd,), daemon=True)
    thread.start()
    try:
        yield state
    finally:
        signal.set_wakeup_fd(previous_wakeup)
        for signum, handler in previous.items():  # None: a handler not set from Python
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        os.close(write_fd)  # the thread reads end-of-file and returns
        thread.join(timeout=5)
        os.close(read_fd)


def _count_signals(read_fd: int) -> None:
    """Announces the first watched signal; ends the process at the second."""
    seen = 0
    while data := os.read(read_fd, 64):
        for signum in data:
            if signum not in SIGNALS:
                continue
            seen += 1
            name = signal.Signals(signum).name
            if seen == 1:
                os.write(
                    2,
                    f"{name}: stopping after the step in hand to save it (send it again to "
                    "stop at once, keeping the last complete checkpoint)\n".encode(),
                )
            else:
                os.write(2, f"{name} again: stopping at once\n".encode())
                os._exit(128 + signum)
