"""How far a pruned network's output is from the unpruned one: the D of every rate-distortion curve.

Two measures, each averaged over the samples or taken at the worst sample:

- ``mse``: the squared error of the outputs, averaged over every output value (the method's
  definition; it weighs every logit direction alike, including a shift of all logits, which
  changes no prediction);
- ``kl``: the Kullback-Leibler divergence ``KL(softmax(Y) || softmax(Ŷ))`` over the class
  dimension (dimension 1; any further dimensions are positions, averaged). To second order it is
  the squared error of the logits weighted by the softmax's Fisher information: it counts only
  the changes that move the predicted distribution. Measured, it adds up over channel groups far
  less than ``mse`` does (docs/compare_channel_peers.md), which is why it is not the default.

A curve's value is built batch by batch: :meth:`Distortion.batch` gives a batch's sum (or worst
sample), :meth:`Distortion.combine` adds batches up and :meth:`Distortion.finish` divides by
what the mean is over.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

Measure = Literal["mse", "kl"]
MEASURES: tuple[str, ...] = ("mse", "kl")
DistortionName = Literal["mse", "worst_case", "kl"]


@dataclass(frozen=True)
class Distortion:
    """An output distortion: ``measure`` per sample, averaged over samples or (``worst_case``) their maximum."""

    measure: Measure = "mse"
    worst_case: bool = False

    def __post_init__(self) -> None:
        if self.measure not in MEASURES:
            raise ValueError(f"unknown distortion measure {self.measure!r}; choose one of {', '.join(MEASURES)}")

    @classmethod
    def named(cls, name: DistortionName) -> Distortion:
        """The config's ``prune.distortion``: ``mse``, ``worst_case`` (of the squared error) or ``kl``."""
        return cls("kl" if name == "kl" else "mse", worst_case=name == "worst_case")

    @property
    def cache_key(self) -> str:
        """The curve cache's settings for this distortion (the squared error's keys as before ``kl`` existed)."""
        return f"worst_case={self.worst_case}" + ("" if self.measure == "mse" else f":measure={self.measure}")

    def per_sample(self, reference: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Each sample's distortion (float64, on the outputs' device): mean squared error, or KL summed over classes."""
        if self.measure == "kl":
            if reference.dim() < 2:
                raise ValueError(f"the kl distortion needs outputs of shape (batch, classes, ...), got shape {tuple(reference.shape)}")
            p = torch.log_softmax(reference.double(), dim=1)
            q = torch.log_softmax(out.double(), dim=1)
            kl = (p.exp() * (p - q)).sum(dim=1)
            return kl.reshape(len(kl), -1).mean(dim=1)
        err = (out.double() - reference.double()).pow_(2)
        return err.reshape(len(err), -1).mean(dim=1)

    def batch(self, reference: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """This batch's contribution: the sum of what the mean is over, or the worst sample (a float64 scalar on
        the outputs' device, so that a caller can collect many without waiting for the device)."""
        if self.worst_case:
            return self.per_sample(reference, out).max()
        if self.measure == "mse":
            return (out.double() - reference.double()).pow_(2).sum()
        return self.per_sample(reference, out).sum()

    def combine(self, total: np.ndarray | float, value: np.ndarray | float) -> np.ndarray | float:
        """Two batches' contributions together: their maximum (worst case) or their sum."""
        return np.maximum(total, value) if self.worst_case else total + value

    def finish(self, total: np.ndarray, references: Sequence[torch.Tensor]) -> np.ndarray:
        """The mean from the combined contributions over all ``references`` batches (the worst case is final)."""
        if self.worst_case:
            return total
        count = sum(r.numel() for r in references) if self.measure == "mse" else sum(len(r) for r in references)
        return total / count

    def measured(self, reference: torch.Tensor, out: torch.Tensor) -> float:
        """The distortion of ``out`` against ``reference`` in one call (all samples at once)."""
        per_sample = self.per_sample(reference, out)
        return float(per_sample.max() if self.worst_case else per_sample.mean())
