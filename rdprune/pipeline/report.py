"""The end-of-run table printed to the terminal."""
from __future__ import annotations

from collections.abc import Sequence

from rdprune.granularity.spec import all_columns


def results_table(rows: Sequence[dict]) -> str:
    """Iteration, sparsity, FLOPs remaining and top-1 (after pruning and after fine-tuning) as text.

    Runs under a latency budget add the measured latency and speedup (iteration 0: dense), or the
    predicted latency where none is measured; a granularity's own columns (e.g. how many candidate
    layers are 2:4) follow where its rows carry them.
    """
    timed = any("latency_ms" in r for r in rows)
    columns = [c for c in all_columns() if any(c.key in r for r in rows)]
    predicted = any("latency_predicted_ms" in r for r in rows) and not timed
    head = f"{'iter':>4}  {'method':<8} {'sparsity':>9} {'FLOPs left':>10} {'top-1 pruned':>12} {'top-1':>7} {'loss':>7} {'time':>8}"
    if timed:
        head += f" {'latency':>10} {'speedup':>8}"
    widths = [max(len(c.header), 10) for c in columns]
    head += "".join(f" {c.header:>{w}}" for c, w in zip(columns, widths))
    if predicted:
        head += f" {'predicted':>12}"
    lines = [head, "-" * len(head)]
    for r in rows:
        line = (f"{r['iteration']:>4}  {r['method']:<8} {100 * r['sparsity']:>8.2f}% {100 * r['flops_remaining']:>9.2f}% "
                f"{r['top1_pruned']:>11.2f}% {r['top1']:>6.2f}% {r['loss']:>7.4f} {r['seconds']:>7.1f}s")
        if timed:
            line += (f" {r['latency_ms']:>7.2f} ms {r['latency_speedup']:>7.2f}x" if "latency_ms" in r else f" {'':>10} {'':>8}")
        line += "".join(f" {c.cell(r) if c.key in r else '':>{w}}" for c, w in zip(columns, widths))
        if predicted:
            line += f" {r['latency_predicted_ms']:>9.3f} ms" if "latency_predicted_ms" in r else f" {'':>12}"
        lines.append(line)
    return "\n".join(lines)
