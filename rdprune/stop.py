"""Stopping a run on SIGTERM or SIGINT at the next safe point, keeping what lets a rerun resume.

A cluster ends a job with SIGTERM (torchrun forwards it to every worker; SLURM sends it at
preemption, cancellation and requeue, then SIGKILL after ``KillWait``, 30 s by default), a user
with Ctrl-C (SIGINT). The CLI installs :func:`handling_signals`: the handler only notes the signal.
The run stops at its next safe point and raises :class:`Stopped`:

* a training step (:func:`rdprune.training.engine.train_steps`): fine-tuning saves its checkpoint
  first (the one ``finetune.checkpoint_every`` writes), so no step is lost; pretraining, which has
  no checkpoint, is redone by the rerun;
* a curve piece (:func:`check_local`): the pieces finished so far are in the curve cache already;
* the start of an iteration and of the end of the run.

Ranks agree where they must (training steps run in lockstep: the flag is summed over ranks every
step when there are several), so every rank stops at the same step. The CLI prints one line and
exits 128 + the signal's number (143 for SIGTERM, 130 for SIGINT). A second SIGINT, a second or
more after the first, stops at once (``KeyboardInterrupt``); every file is written atomically, so
that too leaves nothing half-written.
"""
from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

SIGNALS = (signal.SIGTERM, signal.SIGINT)
AGAIN_AFTER_S = 1.0
"""A second SIGINT this long after the first stops at once: earlier, it is the same Ctrl-C delivered
twice (the terminal's and the one torchrun forwards)."""

_requested: int | None = None
_first_at = 0.0


class Stopped(KeyboardInterrupt):
    """The run stopped at a safe point on a signal; ``signum`` says which. A rerun resumes it.

    A ``KeyboardInterrupt``: no ``except Exception`` handler swallows it, and it is not announced to
    the other ranks as a failure (they stop on the same signal).
    """

    def __init__(self, signum: int, what: str):
        super().__init__(what)
        self.signum = signum
        self.what = what

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def _note(signum: int, frame: object) -> None:
    global _requested, _first_at
    now = time.monotonic()
    if _requested is None:
        _requested, _first_at = signum, now
    elif signum == signal.SIGINT and now - _first_at >= AGAIN_AFTER_S:
        raise KeyboardInterrupt


def request(signum: int = signal.SIGTERM) -> None:
    """Note a stop as the handler does (tests, or a caller that learns of a preemption otherwise)."""
    global _requested, _first_at
    if _requested is None:
        _requested, _first_at = signum, time.monotonic()


def requested() -> int | None:
    """The signal noted on this rank, or None."""
    return _requested


def clear() -> None:
    global _requested
    _requested = None


@contextmanager
def handling_signals() -> Iterator[None]:
    """Within: SIGTERM and SIGINT only note a stop (main thread only); the earlier handlers come back after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    clear()
    previous = {s: signal.signal(s, _note) for s in SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        clear()


def agreed() -> int | None:
    """The signal noted on any rank (a collective when there are several ranks: call it on every rank alike)."""
    from rdprune.distributed.collectives import all_reduce_sum, several_ranks

    mine = _requested
    if not several_ranks():
        return mine
    import torch

    counts = all_reduce_sum(torch.tensor([mine == signal.SIGTERM, mine == signal.SIGINT], dtype=torch.int64))
    if mine is not None:
        return mine
    return signal.SIGTERM if counts[0] > 0 else signal.SIGINT if counts[1] > 0 else None


def check(what: str) -> None:
    """A safe point every rank reaches alike: raise :class:`Stopped` if a stop was noted on any rank."""
    signum = agreed()
    if signum is not None:
        raise Stopped(signum, what)


def check_local(what: str) -> None:
    """A safe point of this rank alone (a curve piece): raise :class:`Stopped` if this rank noted a stop.

    No collective: ranks do different work here. Every rank gets the signal (torchrun forwards it to
    every worker, SLURM signals every process), so each stops at its own next safe point.
    """
    if _requested is not None:
        raise Stopped(_requested, what)


def ignore_in_worker(_: int = 0) -> None:
    """A DataLoader ``worker_init_fn``: data workers ignore SIGTERM and SIGINT, which reach them too
    (torchrun signals the worker's process group, SLURM every process of the job); the main process
    stops at its safe point and then ends them. Left to the default, a worker killed by the signal
    would fail the main process's next batch."""
    for s in SIGNALS:
        signal.signal(s, signal.SIG_IGN)
