"""The training engine protocol and the step loop that drives any engine.

An engine owns one optimiser step with pruned weights held at zero: :class:`LocalEngine` (this
process, DDP when there are several ranks) or :class:`DeepSpeedEngine`. The pipeline builds one per
training phase, runs :func:`train_steps`, and closes it.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

import torch
from tqdm import tqdm

from rdprune import stop


class Engine(Protocol):
    """What the loop needs of an engine."""

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """One optimiser step on this rank's batch; its loss."""

    def save(self, directory: Path, iteration: int, step: int) -> None:
        """Write the training state after ``step`` steps of ``iteration`` (every rank calls it)."""

    def load(self, directory: Path) -> int:
        """Restore :meth:`save`'s state on every rank; the step it was saved after."""

    def close(self) -> None:
        """Release hooks and engine resources."""


def train_steps(
    engine: Engine,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    steps: int,
    *,
    start: int = 0,
    every: int = 0,
    checkpoint: Callable[[int], None] | None = None,
    desc: str = "train",
    progress: bool = True,
) -> float:
    """Run engine steps ``start+1 .. steps`` on ``batches``; return this rank's mean training loss over them.

    ``checkpoint(step)``, when given, is called after every ``every``-th step but the last
    (the caller records the end of training itself).

    Every step is a safe point (:mod:`rdprune.stop`): on a SIGTERM or SIGINT noted on any rank, every
    rank stops after the same step, saves ``checkpoint(step)`` (also after the last step: the rerun then
    goes straight on to evaluation) and raises :class:`~rdprune.stop.Stopped`.
    """
    total = 0.0
    bar = tqdm(range(start, steps), desc=desc, initial=start, total=steps, disable=not progress, leave=False, dynamic_ncols=True)
    for step in bar:
        loss = engine.train_step(*next(batches))
        total += loss
        bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
        done = step + 1
        signum = stop.agreed()
        if signum is not None:
            if checkpoint is not None:
                checkpoint(done)
            raise stop.Stopped(signum, f"{desc}: stopped after step {done} of {steps}"
                                       f"{', saved' if checkpoint is not None else ''}")
        if checkpoint is not None and every and done % every == 0 and done < steps:
            checkpoint(done)
    return total / max(1, steps - start)
