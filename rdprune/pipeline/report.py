"""The end-of-run table printed to the terminal."""
from __future__ import annotations

from collections.abc import Sequence


def results_table(rows: Sequence[dict]) -> str:
    """Iteration, sparsity, FLOPs remaining and top-1 (after pruning and after fine-tuning) as text.

    Runs under a latency budget add the measured latency and speedup (iteration 0: dense).
    """
    timed = any("latency_ms" in r for r in rows)
    head = f"{'iter':>4}  {'method':<8} {'sparsity':>9} {'FLOPs left':>10} {'top-1 pruned':>12} {'top-1':>7} {'loss':>7} {'time':>8}"
    if timed:
        head += f" {'latency':>10} {'speedup':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        line = (f"{r['iteration']:>4}  {r['method']:<8} {100 * r['sparsity']:>8.2f}% {100 * r['flops_remaining']:>9.2f}% "
                f"{r['top1_pruned']:>11.2f}% {r['top1']:>6.2f}% {r['loss']:>7.4f} {r['seconds']:>7.1f}s")
        if timed:
            line += (f" {r['latency_ms']:>7.2f} ms {r['latency_speedup']:>7.2f}x" if "latency_ms" in r else f" {'':>10} {'':>8}")
        lines.append(line)
    return "\n".join(lines)
