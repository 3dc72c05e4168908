"""The comparison of a sweep: method x sparsity level, mean ± std over seeds, as Markdown, CSV and a plot.

At every level the best mean is marked; a method whose mean differs from the best by no more than
the spread across seeds (the larger of the two standard deviations) is marked as within that
spread, not as a loss, and the best is then not reported as a clear win.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker as ticker  # noqa: E402
import numpy as np  # noqa: E402

from rdprune.files import atomic_write_text  # noqa: E402
from rdprune.granularity.spec import all_columns
from rdprune.pipeline.plots import save_figure  # noqa: E402

Results = Mapping[str, Mapping[int, Sequence[Mapping]]]
"""``{entry: {seed: results.jsonl rows}}`` as ``rdprune.sweep.plan.run_sweep`` returns it."""

CLEAR_BEST = "best"
TIED_BEST = "best, ≈ tie"
WITHIN = "≈ best, within seed spread"
BELOW = "below best"
ONLY = "only entry"
_LEVEL_DIGITS = 6  # schedule targets are rounded to 10 digits in results.jsonl; 6 groups them safely


@dataclass(frozen=True)
class Stat:
    """Mean and sample standard deviation over seeds (std is nan for a single seed)."""

    mean: float
    std: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Stat:
        arr = np.asarray(values, dtype=float)
        std = float(arr.std(ddof=1)) if len(arr) > 1 else math.nan
        return cls(float(arr.mean()), std, len(arr))

    @property
    def spread(self) -> float:
        return 0.0 if math.isnan(self.std) else self.std

    def text(self, digits: int = 2) -> str:
        if math.isnan(self.std):
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}"


@dataclass(frozen=True)
class LevelRow:
    """One method at one sparsity level of the schedule."""

    level: float  # the schedule's target (weights or FLOPs, as prune.budget says)
    entry: str
    seeds: int
    sparsity: Stat
    top1: Stat  # after fine-tuning
    top1_pruned: Stat  # right after pruning, before fine-tuning
    flops_remaining: Stat
    speedup: Stat | None = None  # measured latency speedup (latency budgets)
    extra: dict[str, Stat] = dataclasses.field(default_factory=dict)  # the granularities' columns (all_columns) rows carry
    pruned_by_seed: dict[int, float] = dataclasses.field(default_factory=dict)  # top-1 right after pruning, per seed
    paired: Stat | None = None  # top-1 right after pruning minus the best peer's, seed by seed (sweep.peers)
    paired_peer: str = ""  # that best peer
    paired_beyond: bool = False  # the difference is beyond the paired seed spread (see paired)
    mark_top1: str = ""
    gap_top1: float = math.nan  # points below the level's best mean
    mark_pruned: str = ""
    gap_pruned: float = math.nan


def dense_top1(results: Results) -> Stat | None:
    """Top-1 of the dense starting model (iteration 0), one value per seed: every run of a seed starts from the
    same checkpoint (the sweep's, or the seed's own with ``sweep.pretrain_per_seed``), so the spread is the seeds',
    as the table's legend says, whatever number of methods ran."""
    by_seed: dict[int, list[float]] = {}
    for runs in results.values():
        for seed, rows in runs.items():
            if rows:
                by_seed.setdefault(seed, []).append(rows[0]["top1"])
    return Stat.of([sum(v) / len(v) for v in by_seed.values()]) if by_seed else None


def summarise(results: Results, peers: Sequence[str] = ()) -> list[LevelRow]:
    """Rows sorted by level, then in the sweep's entry order, with best / within-spread marks; with ``peers``, every
    other entry's top-1 right after pruning minus the best peer's at its level, seed by seed (:func:`paired`)."""
    grouped: dict[tuple[float, str], list[Mapping]] = {}
    seeds: dict[tuple[float, str], list[int]] = {}
    for entry, runs in results.items():
        for seed, rows in runs.items():
            for r in rows:
                if r["iteration"] > 0:
                    key = (round(r["target_sparsity"], _LEVEL_DIGITS), entry)
                    grouped.setdefault(key, []).append(r)
                    seeds.setdefault(key, []).append(seed)
    order = {entry: i for i, entry in enumerate(results)}
    rows = [
        LevelRow(
            level=level,
            entry=entry,
            seeds=len(rs),
            sparsity=Stat.of([r["sparsity"] for r in rs]),
            top1=Stat.of([r["top1"] for r in rs]),
            top1_pruned=Stat.of([r["top1_pruned"] for r in rs]),
            flops_remaining=Stat.of([r["flops_remaining"] for r in rs]),
            speedup=Stat.of([r["latency_speedup"] for r in rs]) if all("latency_speedup" in r for r in rs) else None,
            extra={c.key: Stat.of([r[c.key] for r in rs]) for c in all_columns() if all(c.key in r for r in rs)},
            pruned_by_seed={s: r["top1_pruned"] for s, r in zip(seeds[(level, entry)], rs)},
        )
        for (level, entry), rs in sorted(grouped.items(), key=lambda kv: (kv[0][0], order[kv[0][1]]))
    ]
    marked: list[LevelRow] = []
    for level in sorted({r.level for r in rows}):
        at_level = [r for r in rows if r.level == level]
        top1 = _marks([r.top1 for r in at_level])
        pruned = _marks([r.top1_pruned for r in at_level])
        best_peer = max((r for r in at_level if r.entry in peers), key=lambda r: r.top1_pruned.mean, default=None)
        marked += [
            dataclasses.replace(r, mark_top1=a[0], gap_top1=a[1], mark_pruned=b[0], gap_pruned=b[1],
                                **(paired(r, best_peer) if best_peer is not None and r.entry not in peers else {}))
            for r, a, b in zip(at_level, top1, pruned)
        ]
    return marked


def paired(row: LevelRow, peer: LevelRow) -> dict:
    """``row``'s top-1 right after pruning minus ``peer``'s on the seeds both ran, as LevelRow fields.

    Beyond the paired seed spread means: the same sign on every seed, and a mean larger than the
    standard deviation of the differences (never with a single seed).
    """
    shared = sorted(set(row.pruned_by_seed) & set(peer.pruned_by_seed))
    if not shared:
        return {}
    diffs = [row.pruned_by_seed[s] - peer.pruned_by_seed[s] for s in shared]
    stat = Stat.of(diffs)
    same_sign = all(d > 0 for d in diffs) or all(d < 0 for d in diffs)
    return {"paired": stat, "paired_peer": peer.entry,
            "paired_beyond": same_sign and stat.n > 1 and abs(stat.mean) > stat.std}


def _paired_text(row: LevelRow) -> str:
    if row.paired is None:
        return ""
    verdict = (" **beyond spread**" if row.paired.mean > 0 else " below, beyond spread") if row.paired_beyond else ""
    return f"{row.paired.mean:+.2f} ± {row.paired.spread:.2f} vs {row.paired_peer}{verdict}"


def _marks(stats: Sequence[Stat]) -> list[tuple[str, float]]:
    """Per method (mark, gap in points below the best mean): the best is a clear win only when
    every other mean lies further below it than the seed spread of the pair."""
    if len(stats) == 1:
        return [(ONLY, 0.0)]
    best = max(range(len(stats)), key=lambda i: stats[i].mean)
    gaps = [stats[best].mean - s.mean for s in stats]
    within = [i != best and gaps[i] <= max(stats[best].spread, stats[i].spread) for i in range(len(stats))]
    marks = [WITHIN if within[i] else BELOW for i in range(len(stats))]
    marks[best] = TIED_BEST if any(within) else CLEAR_BEST
    return list(zip(marks, gaps))


def _vs_best(mark: str, gap: float) -> str:
    if mark in (CLEAR_BEST, TIED_BEST):
        return f"**{mark}**"
    points = f"-{gap:.2f}" if round(gap, 2) > 0 else "0.00"  # not "-0.00" for an exact tie
    if mark == WITHIN:
        return f"≈ ({points}, within seed spread)"
    if mark == BELOW:
        return points
    return mark


def markdown_table(rows: Sequence[LevelRow], dense: Stat | None = None, seeds: Sequence[int] = ()) -> str:
    """The comparison as Markdown: a short legend, then one table row per (level, method)."""
    lines = []
    if dense is not None:
        lines.append(f"Dense model (every run starts from it): top-1 {dense.text()} %.")
    if len(seeds) == 1:
        lines.append(f"One seed ({seeds[0]}): no spread across seeds is measured, so every gap counts.")
    elif seeds:
        lines.append(f"Mean ± sample std over seeds {', '.join(map(str, seeds))}. 'vs best': points below the "
                     "level's best mean. A gap no larger than the seed spread (the larger std of the pair) is "
                     f"marked '≈ … within seed spread' and the best is then '{TIED_BEST}', not a win.")
    if lines:
        lines.append("")
    timed = any(r.speedup is not None for r in rows)
    columns = [c for c in all_columns() if any(c.key in r.extra for r in rows)]
    peers = any(r.paired is not None for r in rows)
    lines += [
        "| level | method | weights pruned (%) | top-1 after fine-tuning (%) | vs best | "
        "top-1 right after pruning (%) | vs best | FLOPs left (%) |" + (" measured speedup |" if timed else "")
        + "".join(f" {c.header} |" for c in columns) + (" right after pruning vs best peer, paired (points) |" if peers else "")
        + " seeds |",
        "|---:|---|---:|---:|---|---:|---|---:|" + ("---:|" if timed else "") + "---:|" * len(columns) + ("---|" if peers else "")
        + "---:|",
    ]
    for r in rows:
        level = f"{100 * r.level:.2f} %"
        speedup = (f" {r.speedup.text()}x |" if r.speedup is not None else " |") if timed else ""
        extra = "".join(f" {c.mean_format.format(r.extra[c.key].mean)} |" if c.key in r.extra else " |" for c in columns)
        extra += f" {_paired_text(r)} |" if peers else ""
        lines.append(
            f"| {level} | {r.entry} | {100 * r.sparsity.mean:.2f} | {r.top1.text()} | "
            f"{_vs_best(r.mark_top1, r.gap_top1)} | {r.top1_pruned.text()} | "
            f"{_vs_best(r.mark_pruned, r.gap_pruned)} | {100 * r.flops_remaining.mean:.2f} |{speedup}{extra} {r.seeds} |"
        )
    return "\n".join(lines)


_BASE_COLUMNS = (
    "level", "method", "seeds", "sparsity_mean", "top1_mean", "top1_std", "top1_gap", "top1_mark",
    "top1_pruned_mean", "top1_pruned_std", "top1_pruned_gap", "top1_pruned_mark", "flops_remaining_mean",
    "latency_speedup_mean", "paired_vs_peer_mean", "paired_vs_peer_std", "paired_peer", "paired_beyond_spread",
)


def csv_columns() -> tuple[str, ...]:
    """The CSV header: the columns of every sweep, then ``<key>_mean`` of each registered granularity column."""
    return (*_BASE_COLUMNS, *(f"{c.key}_mean" for c in all_columns()))


CSV_COLUMNS = csv_columns()
"""The CSV header with rdprune's own granularities."""


def csv_table(rows: Sequence[LevelRow]) -> str:
    """The comparison as CSV: fractions for level, sparsity and FLOPs; percent and points for top-1 and
    gaps; an empty std for a single seed."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    columns = all_columns()
    writer.writerow(csv_columns())

    def number(x: float) -> str:
        return "" if math.isnan(x) else f"{x:.6g}"

    for r in rows:
        writer.writerow([
            f"{r.level:.6g}", r.entry, r.seeds, number(r.sparsity.mean),
            number(r.top1.mean), number(r.top1.std), number(r.gap_top1), r.mark_top1,
            number(r.top1_pruned.mean), number(r.top1_pruned.std), number(r.gap_pruned), r.mark_pruned,
            number(r.flops_remaining.mean), "" if r.speedup is None else number(r.speedup.mean),
            "" if r.paired is None else number(r.paired.mean), "" if r.paired is None else number(r.paired.std), r.paired_peer,
            "" if r.paired is None else str(r.paired_beyond).lower(),
            *("" if c.key not in r.extra else number(r.extra[c.key].mean) for c in columns),
        ])
    return buffer.getvalue()


def plot_comparison(rows: Sequence[LevelRow], dense: Stat | None, path: Path, title: str) -> None:
    """Top-1 against weights remaining (log scale, densest left), every method on one axis per panel:
    after fine-tuning and right after pruning; error bars are the std over seeds."""
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    entries = list(dict.fromkeys(r.entry for r in rows))
    markers = "osD^v<>ph*"
    for ax, attr, panel in ((axes[0], "top1", "after fine-tuning"), (axes[1], "top1_pruned", "right after pruning")):
        for i, entry in enumerate(entries):
            mine = sorted((r for r in rows if r.entry == entry), key=lambda r: r.level)
            x = [100 * (1 - r.sparsity.mean) for r in mine]
            y = [getattr(r, attr).mean for r in mine]
            err = [getattr(r, attr).spread for r in mine]
            # Matplotlib cycles 10 colours: dashes tell the 11th entry on from the first ten.
            ax.errorbar(x, y, yerr=err, marker=markers[i % len(markers)], ms=4, capsize=3, lw=1.2,
                        ls="-" if i < 10 else "--", label=entry)
        if dense is not None:  # a lone point: joining it to a one-shot run's level would invent a curve
            ax.errorbar([100.0], [dense.mean], yerr=[dense.spread], marker="*", ms=10, color="black", ls="", label="dense")
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(ticker.FixedLocator([100, 50, 25, 10, 5, 2, 1]))
        ax.xaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.invert_xaxis()
        ax.set_xlabel("weights remaining (%, log scale)")
        ax.set_ylabel("top-1 (%)")
        ax.set_title(panel)
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    save_figure(fig, path)


def write_comparison(out: Path, results: Results, seeds: Sequence[int], title: str, peers: Sequence[str] = ()) -> str:
    """Write comparison.md, comparison.csv and comparison.png under ``out``; returns the Markdown."""
    rows = summarise(results, peers)
    dense = dense_top1(results)
    text = markdown_table(rows, dense, seeds)
    atomic_write_text(out / "comparison.md", f"# {title}\n\n{text}\n")
    atomic_write_text(out / "comparison.csv", csv_table(rows))
    plot_comparison(rows, dense, out / "comparison.png", title)
    return text
