"""The end-of-run table printed to the terminal."""
from __future__ import annotations

from collections.abc import Sequence


def results_table(rows: Sequence[dict]) -> str:
    """Iteration, sparsity, FLOPs remaining and top-1 (after pruning and after fine-tuning) as text.

    Runs under a latency budget add the measured latency and speedup (iteration 0: dense); 2:4 runs
    add how many candidate layers are 2:4, and under a latency budget the predicted latency.
    """
    timed = any("latency_ms" in r for r in rows)
    two_four = any("layers_2to4" in r for r in rows)
    predicted = any("latency_predicted_ms" in r for r in rows) and not timed
    head = f"{'iter':>4}  {'method':<8} {'sparsity':>9} {'FLOPs left':>10} {'top-1 pruned':>12} {'top-1':>7} {'loss':>7} {'time':>8}"
    if timed:
        head += f" {'latency':>10} {'speedup':>8}"
    if two_four:
        head += f" {'2:4 layers':>10}"
    if predicted:
        head += f" {'predicted':>12}"
    lines = [head, "-" * len(head)]
    for r in rows:
        line = (f"{r['iteration']:>4}  {r['method']:<8} {100 * r['sparsity']:>8.2f}% {100 * r['flops_remaining']:>9.2f}% "
                f"{r['top1_pruned']:>11.2f}% {r['top1']:>6.2f}% {r['loss']:>7.4f} {r['seconds']:>7.1f}s")
        if timed:
            line += (f" {r['latency_ms']:>7.2f} ms {r['latency_speedup']:>7.2f}x" if "latency_ms" in r else f" {'':>10} {'':>8}")
        if two_four:
            line += f" {r['layers_2to4']:>3} of {r['candidates']:>3}" if "layers_2to4" in r else f" {'':>10}"
        if predicted:
            line += f" {r['latency_predicted_ms']:>9.3f} ms" if "latency_predicted_ms" in r else f" {'':>12}"
        lines.append(line)
    return "\n".join(lines)
