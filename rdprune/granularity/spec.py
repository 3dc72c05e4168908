"""What a granularity declares before anything heavy is imported: its names, budgets, config rules, columns.

The config schema validates ``prune.*`` against these, and the reports add a granularity's columns,
without importing torch or the granularity's implementation; :attr:`GranularitySpec.plugin` names
the stage class (:class:`rdprune.granularity.base.GranularityStage`) that a run builds.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rdprune import registry
from rdprune.errors import ConfigError


@dataclass(frozen=True)
class RowColumn:
    """A column of the end-of-run table for rows that carry ``key`` (e.g. how many layers are 2:4)."""

    key: str
    header: str
    cell: Callable[[dict], str]  # the row's cell, without padding
    mean_format: str = "{:.1f}"  # how a sweep table writes the mean over seeds


@dataclass(frozen=True)
class GranularitySpec:
    """A granularity's declaration: what a config may combine with it, and where its stage lives."""

    name: str
    """The value of prune.granularity."""
    unit: str
    """What one unit of the allocation is called in logs, plots and tables ("layer", "channel group")."""
    form: str
    """How an error names a method's form at this granularity ("channel": "'lamp' has no channel form")."""
    methods: tuple[str, ...]
    """prune.method values it implements: rd and its baselines."""
    budgets: tuple[str, ...]
    """prune.budget values it implements."""
    plugin: str
    """Import path 'package.module:Class' of its stage (imported when a run uses it)."""
    reads_latency: bool = False
    """Whether the latency section changes its results (then it counts in the resume key)."""
    bn_aware_curves: bool = False
    """Whether it offers prune.bn_aware_curves."""
    bn_aware_default: bool = False
    """prune.bn_aware_curves when the config leaves it null."""
    bn_aware_one_batch: bool = False
    """Whether its BatchNorm-aware curves need the calibration inputs in one batch."""
    rankings: tuple[str, ...] = ("l2",)
    """prune.ranking values it implements (which weights or channels go first)."""
    default_ranking: str = "l2"
    """prune.ranking when the config leaves it null."""
    labelled_rankings: tuple[str, ...] = ()
    """Those of its rankings that need labelled calibration data."""
    round_to: bool = False
    """Whether it offers prune.round_to (widths in multiples of N) with method rd."""
    curve_rounds: bool = False
    """Whether it offers prune.curve_rounds (several allocations per iteration, curves re-measured between)."""
    latency_runtimes: tuple[str, ...] = ("torch",)
    """latency.runtime values its latency budget and measurements run in."""
    max_min_density: float = 1.0
    """prune.min_density may be at most this."""
    min_density_reason: str = ""
    """Why, where max_min_density is below 1."""
    budget_refusals: dict[str, str] | None = None
    """Why a budget it does not offer makes no sense here, for the error that refuses it."""
    budget_words: dict[str, str] | None = None
    """How a log line names what a budget counts, where "<budget> removed" would mislead."""
    columns: tuple[RowColumn, ...] = ()
    """Columns its result rows add to the end-of-run and sweep tables."""

    def check(self, cfg: Any) -> None:
        """The config rules this granularity owns: its methods, budgets, rankings and limits, as ConfigErrors."""
        prune = cfg.prune
        if prune.budget not in self.budgets:
            raise ConfigError("prune.budget", f"prune.budget {prune.budget!r} needs prune.granularity "
                              f"{_offering(lambda s: prune.budget in s.budgets)}{self._why_not(prune.budget)}; at {self.name!r} choose "
                              f"{', '.join(self.budgets[:-1])} or {self.budgets[-1]}", related=["prune.granularity"])
        if prune.method not in self.methods:
            raise ConfigError("prune.method", f"prune.method {prune.method!r} has no {self.form} form; at prune.granularity "
                              f"{self.name!r} choose one of {', '.join(map(repr, self.methods))}", related=["prune.granularity"])
        if prune.bn_aware_curves and not self.bn_aware_curves:
            raise ConfigError("prune.bn_aware_curves", "prune.bn_aware_curves is for prune.granularity "
                              f"{_offering(lambda s: s.bn_aware_curves)} only", related=["prune.granularity"])
        if prune.ranking not in self.rankings:
            raise ConfigError("prune.ranking", f"prune.ranking {prune.ranking!r} is not offered at prune.granularity {self.name!r}: "
                              f"choose {' or '.join(map(repr, self.rankings))}", related=["prune.granularity"])
        if prune.ranking in self.labelled_rankings and cfg.calibration.source != "data":
            raise ConfigError("prune.ranking", f"prune.ranking {prune.ranking!r} needs labelled calibration images (a loss "
                              "gradient), which zero-data pruning has none of: set calibration.source data, or choose "
                              f"prune.ranking {' or '.join(repr(r) for r in self.rankings if r not in self.labelled_rankings)}",
                              related=["calibration.source"])
        if (prune.bn_aware_curves and self.bn_aware_one_batch and prune.method == "rd"
                and cfg.calibration.batch_size < cfg.calibration.size):
            default = " (its default there)" if self.bn_aware_default else ""
            raise ConfigError("prune.bn_aware_curves", f"prune.bn_aware_curves{default} at prune.granularity {self.name!r} "
                              "measures the calibration inputs in one batch: set calibration.batch_size to at least "
                              f"calibration.size ({cfg.calibration.size}), or prune.bn_aware_curves: false",
                              related=["calibration.batch_size", "calibration.size"])
        if prune.round_to > 1 and not (self.round_to and prune.method == "rd"):
            raise ConfigError("prune.round_to", f"prune.round_to {prune.round_to} applies to prune.granularity "
                              f"{_offering(lambda s: s.round_to)} with method rd (got granularity {self.name}, method "
                              f"{prune.method}); leave it at 1", related=["prune.granularity", "prune.method"])
        if prune.curve_rounds > 1 and not (self.curve_rounds and prune.method == "rd"):
            raise ConfigError("prune.curve_rounds", f"prune.curve_rounds {prune.curve_rounds} applies to prune.granularity "
                              f"{_offering(lambda s: s.curve_rounds)} with method rd (got granularity {self.name}, method "
                              f"{prune.method}); leave it at 1", related=["prune.granularity", "prune.method"])
        if cfg.latency.runtime not in self.latency_runtimes:
            raise ConfigError("latency.runtime", f"latency.runtime {cfg.latency.runtime} is not offered at prune.granularity "
                              f"{self.name!r}; choose {' or '.join(self.latency_runtimes)}", related=["prune.granularity"])
        if prune.min_density > self.max_min_density:
            raise ConfigError("prune.min_density", f"prune.min_density {prune.min_density} cannot hold at prune.granularity "
                              f"{self.name!r}: {self.min_density_reason}; choose at most {self.max_min_density}",
                              related=["prune.granularity"])

    def _why_not(self, budget: str) -> str:
        return f" ({self.budget_refusals[budget]})" if budget in (self.budget_refusals or {}) else ""

    def budget_word(self, budget: str) -> str:
        """What the log says a target counts, e.g. "weights removed"."""
        return (self.budget_words or {}).get(budget, f"{budget} removed")

    def stage_class(self) -> Any:
        """The stage class (imports the implementation)."""
        return registry.load(self.plugin)


def _offering(has: Callable[[GranularitySpec], bool]) -> str:
    """The registered granularities with a property, as an error names them ("'channel' or 'semi_structured'")."""
    return " or ".join(repr(n) for n, s in registry.GRANULARITIES.entries().items() if has(s))


def spec_of(name: str) -> GranularitySpec:
    """The registered granularity ``name``."""
    return registry.GRANULARITIES.get(name)


def all_columns() -> list[RowColumn]:
    """Every registered granularity's extra result columns, in registration order."""
    return [c for spec in registry.GRANULARITIES.entries().values() for c in spec.columns]
