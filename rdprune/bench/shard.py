"""Benchmark ``python -m rdprune.bench shard``: how evenly curve estimation is shared among ranks.

torchvision ResNet-50 at 224x224, 101 levels on the relative grid, dense. A level's cost is the
FLOPs of the part of the network it re-runs (``curve_costs``: the layer's suffix), so the first
conv costs a whole network per level. Printed for 8, 16 and 64 ranks: the largest shard's cost
over the mean for rdprune's (layer, level range) pieces (goal <= 1.10), next to whole layers
assigned greedily, largest first (the reference a layer-level sharder would reach). Exit 1 when
a piece plan misses the goal.
"""
from __future__ import annotations

import argparse
import heapq
import time

import torch
from torchvision.models import resnet50

from rdprune.bench.report import machine_line
from rdprune.distributed.sharded_curves import curve_work
from rdprune.distributed.sharding import plan_shards, shard_balance

GOAL = 1.10


def whole_layer_balance(costs: dict[str, tuple[float, int]], world: int) -> float:
    """Largest-first greedy assignment of whole layers: max shard over mean."""
    loads = [(0.0, r) for r in range(world)]
    for work in sorted((c * n for c, n in costs.values()), reverse=True):
        load, r = heapq.heappop(loads)
        heapq.heappush(loads, (load + work, r))
    totals = [load for load, _ in loads]
    return max(totals) / (sum(totals) / world)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m rdprune.bench shard", description=__doc__.splitlines()[0])
    parser.add_argument("--levels", type=int, default=101)
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 64])
    args = parser.parse_args(argv)

    print(machine_line() + " (the balances below are a deterministic cost model; only the time varies)")
    torch.manual_seed(0)
    model = resnet50().eval()
    start = time.perf_counter()
    costs, _ = curve_work(model, (3, 224, 224), args.levels, "relative", skip=())
    elapsed = time.perf_counter() - start
    total = sum(c * n for c, n in costs.values())
    first = next(iter(costs))
    print(f"ResNet-50 224x224, {len(costs)} layers, {args.levels} levels: "
          f"{total / 1e12:.2f} TFLOP per calibration sample in all (cost model from curve_costs, {elapsed:.1f} s)")
    print(f"first layer {first}: {costs[first][0] / 1e9:.2f} GFLOP per level, "
          f"{100 * costs[first][0] * costs[first][1] / total:.1f} % of all work")
    print(f"{'ranks':>5}  {'pieces: max/mean':>16}  {'whole layers: max/mean':>22}  {'pieces':>6}")
    ok = True
    for world in args.ranks:
        plan = plan_shards(costs, world)
        balance = shard_balance(plan, costs)
        ok &= balance <= GOAL
        print(f"{world:>5}  {balance:>16.3f}  {whole_layer_balance(costs, world):>22.3f}  {sum(map(len, plan)):>6}")
    print(f"goal: max/mean <= {GOAL:.2f}: {'met' if ok else 'MISSED'}")
    return 0 if ok else 1
