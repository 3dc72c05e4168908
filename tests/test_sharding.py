"""plan_shards: every (layer, level) exactly once, balanced by cost, the same answer for any dict order."""
import random

import pytest

from rdprune.distributed.sharding import Piece, plan_shards, shard_balance, shard_costs


def resnet50_like() -> dict[str, tuple[float, int]]:
    """54 layers, 101 levels; the first layer's level costs a whole network, later ones less and less."""
    costs = {f"layer{i:02d}": (1.0 - i / 60, 101) for i in range(54)}
    costs["layer00"] = (1.0, 101)
    return costs


def covered(plan: list[list[Piece]]) -> list[tuple[str, int]]:
    return [(p.unit, k) for shard in plan for p in shard for k in range(p.start, p.stop)]


@pytest.mark.parametrize("world", [1, 2, 3, 7, 8, 16, 64, 200])
def test_every_level_exactly_once(world):
    costs = resnet50_like()
    plan = plan_shards(costs, world)
    assert len(plan) == world
    units = covered(plan)
    assert sorted(units) == sorted((n, k) for n, (_, levels) in costs.items() for k in range(levels))
    assert all(p.start < p.stop for shard in plan for p in shard)


@pytest.mark.parametrize("world", [8, 16, 64])
def test_balanced_at_cluster_scale(world):
    costs = resnet50_like()
    assert shard_balance(plan_shards(costs, world), costs) <= 1.10
    # Whole layers could not do it: the first layer alone is far above the mean at 64 ranks.
    total = sum(c * n for c, n in costs.values())
    assert costs["layer00"][0] * 101 > 1.10 * total / 64


def test_imbalance_is_below_one_unit():
    rng = random.Random(0)
    costs = {f"l{i}": (rng.uniform(0.1, 5.0), rng.randint(1, 40)) for i in range(30)}
    for world in (2, 5, 13, 50):
        loads = shard_costs(plan_shards(costs, world), costs)
        mean = sum(loads) / world
        assert max(loads) - mean <= max(c for c, _ in costs.values()) + 1e-9


def test_independent_of_dict_order():
    costs = resnet50_like()
    items = list(costs.items())
    random.Random(1).shuffle(items)
    assert plan_shards(dict(items), 16) == plan_shards(costs, 16)


def test_more_ranks_than_levels_leaves_idle_ranks():
    costs = {"a": (3.0, 2), "b": (1.0, 1)}
    plan = plan_shards(costs, 10)
    assert len(plan) == 10 and sum(1 for s in plan if s) == 3
    assert sorted(covered(plan)) == [("a", 0), ("a", 1), ("b", 0)]


def test_zero_costs_balance_by_count_and_empty_work():
    plan = plan_shards({"a": (0.0, 4), "b": (0.0, 4)}, 2)
    assert plan == [[Piece("a", 0, 4)], [Piece("b", 0, 4)]]
    assert plan_shards({"a": (2.0, 0)}, 3) == [[], [], []]
    assert shard_balance([[], []], {}) == 1.0


@pytest.mark.parametrize("bad", [{"a": (-1.0, 3)}, {"a": (float("nan"), 3)}, {"a": (1.0, -2)}, {"a": (1.0, 2.5)}])
def test_bad_costs_rejected(bad):
    with pytest.raises(ValueError, match="cost must be finite"):
        plan_shards(bad, 2)


def test_bad_world_rejected():
    with pytest.raises(ValueError, match="world size"):
        plan_shards({"a": (1.0, 3)}, 0)
