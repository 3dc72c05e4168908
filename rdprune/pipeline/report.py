"""The end-of-run table printed to the terminal."""
from __future__ import annotations

from collections.abc import Sequence


def results_table(rows: Sequence[dict]) -> str:
    """Iteration, sparsity, FLOPs remaining and top-1 (after pruning and after fine-tuning) as text."""
    head = f"{'iter':>4}  {'method':<8} {'sparsity':>9} {'FLOPs left':>10} {'top-1 pruned':>12} {'top-1':>7} {'loss':>7} {'time':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['iteration']:>4}  {r['method']:<8} {100 * r['sparsity']:>8.2f}% {100 * r['flops_remaining']:>9.2f}% "
            f"{r['top1_pruned']:>11.2f}% {r['top1']:>6.2f}% {r['loss']:>7.4f} {r['seconds']:>7.1f}s"
        )
    return "\n".join(lines)
