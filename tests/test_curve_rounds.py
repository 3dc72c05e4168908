"""prune.curve_rounds (an iteration's channel budget cut in equal steps of cost, the curves of each step measured
on the network the earlier steps pruned) against the same rounds done by hand with the public functions, and how run
directories of earlier versions resume under the new settings (curve_rounds, latency.fit_to_measurement)."""
import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from rdprune.config import load_config
from rdprune.core.layers import layer_flops
from rdprune.core.masks import enforce_masks
from rdprune.distributed import DistInfo
from rdprune.errors import UserError
from rdprune.granularity.channel.allocation import allocate_channels
from rdprune.granularity.channel.costs import ChannelCost
from rdprune.granularity.channel.curves import estimate_channel_curves, group_plan
from rdprune.granularity.channel.space import ChannelSpace
from rdprune.granularity.channel.stage import ChannelStage
from rdprune.models.cifar_resnet import resnet20
from rdprune.pipeline.run_dir import RunLayout

from tiny_models import lived_in

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parent.parent
SHAPE = (1, 28, 28)
LEVELS = 5


def _config(*extra: str):
    return load_config(ROOT / "configs" / "quickstart_channels.yaml",
                       ["prune.budget=flops", f"prune.levels={LEVELS}", "prune.bn_aware_curves=true", "calibration.size=40",
                        "calibration.batch_size=40", "prune.min_density=0.1", "prune.ranking=l2", *extra])


def _space(model):
    space = ChannelSpace(model, torch.zeros(1, *SHAPE), min_density=0.1)
    return space, ChannelCost(space, "flops", flops=layer_flops(model, space.layers, SHAPE))


def test_two_rounds_are_two_allocations_with_curves_remeasured_between(tmp_path):
    model = lived_in(resnet20(10, in_channels=1, shortcut="projection"))
    by_hand = copy.deepcopy(model)
    x = torch.randn(40, *SHAPE, generator=torch.Generator().manual_seed(0))
    space, cost = _space(model)
    stage = ChannelStage(_config("prune.curve_rounds=2"), DistInfo(), RunLayout(tmp_path), space, cost,
                         layer_flops(model, space.layers, SHAPE), None, torch.zeros(1, *SHAPE))
    choice = stage.choose(model, 1, 0.5, x, progress=False)

    space, cost = _space(by_hand)
    predicted = 0.0
    for limit in (0.75 * cost.dense, 0.5 * cost.dense):  # half the cut, then the rest, each on fresh curves
        curves = estimate_channel_curves(by_hand, space, x, LEVELS, batch_size=40, progress=False, bn_aware=True)
        plans = {g: group_plan(space, g, LEVELS, "relative") for g in space.groups}
        alloc = allocate_channels(curves, plans, cost, limit)
        predicted += alloc.distortion
        masks = space.channel_masks(space.channels_for(alloc.choice))
        enforce_masks(space.layers, masks)
        if limit == 0.75 * cost.dense:
            first = curves
    assert choice.masks.keys() == masks.keys() and all(torch.equal(choice.masks[k], masks[k]) for k in masks)
    assert choice.info["distortion_predicted"] == pytest.approx(predicted, rel=1e-12)
    assert choice.info["cost_remaining"] <= 0.5
    for g, curve in choice.curves.items():  # the last round's curves, measured on the network the first round cut
        np.testing.assert_array_equal(curve.distortion, curves[g].distortion)
    assert any(not np.array_equal(first[g].amounts, curves[g].amounts) for g in curves)


@pytest.mark.parametrize("extra, says", [
    (["prune.curve_rounds=0"], "prune.curve_rounds must be an integer >= 1"),
    (["prune.curve_rounds=2", "prune.method=unif"], "prune.curve_rounds 2 applies to prune.granularity 'channel' with method rd"),
    (["prune.curve_rounds=2", "prune.granularity=weight", "prune.budget=weights"],
     "prune.curve_rounds 2 applies to prune.granularity 'channel' with method rd"),
])
def test_curve_rounds_refused_where_they_mean_nothing(extra, says):
    with pytest.raises(UserError, match=says):
        _config(*extra)


def test_run_directories_made_before_the_new_keys_resume_as_they_started():
    """A run directory of an earlier version (no prune.curve_rounds, no latency.fit_to_measurement) resumes under
    the defaults; another setting is refused with the value to resume with. The fit counts only for latency budgets."""
    from rdprune.pipeline.loop import resume_key, run_differences

    for budget, fit in (("flops", []), ("latency", ["latency.fit_to_measurement=false"])):
        cfg = _config(f"prune.budget={budget}")
        old = resume_key(cfg)
        old["latency"].pop("fit_to_measurement", None)  # what a run directory of an earlier version holds
        old["prune"].pop("curve_rounds")
        assert run_differences(old, cfg) == []
        assert run_differences(old, _config(f"prune.budget={budget}", "latency.fit_to_measurement=true")) == fit
        assert run_differences(old, _config(f"prune.budget={budget}", "prune.curve_rounds=2")) == ["prune.curve_rounds=1"]
