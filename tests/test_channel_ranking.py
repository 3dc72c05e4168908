"""Channel granularity: curves of the network that will run (BatchNorm renormalised) against their definition, and
the rankings (l2, taylor, bn_scale) against hand computations, with removed channels always first."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from rdprune.config import load_config
from rdprune.core.masks import enforce_masks
from rdprune.errors import UserError
from rdprune.granularity.channel.baselines import channel_baseline
from rdprune.granularity.channel.costs import ChannelCost
from rdprune.granularity.channel.curves import estimate_channel_curves, plain_channel_curves
from rdprune.granularity.channel.ranking import rank_channels
from rdprune.granularity.channel.space import ChannelSpace
from rdprune.models.cifar_resnet import resnet20

from tiny_models import DepthwiseConcat, lived_in

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parent.parent


def _resnet():
    return lived_in(resnet20(10, in_channels=1, shortcut="projection"))


@pytest.mark.parametrize("measure", ["mse", "kl"])
@pytest.mark.parametrize("build,shape", [(_resnet, (1, 28, 28)), (lambda: lived_in(DepthwiseConcat()), (3, 12, 12))])
def test_recalibrated_curves_equal_their_definition(build, shape, measure, tmp_path):
    """remove the group's channels, recalibrate_batchnorm on the inputs, measure: the fast path (one suffix pass
    with each BatchNorm normalising with its new input's statistics) gives the same curves, level 0 exactly zero,
    and leaves weights and statistics as they were."""
    model = build()
    x = torch.randn(40, *shape)
    space = ChannelSpace(model, x[:1])
    first = next(iter(space.groups))
    enforce_masks(space.layers, space.masks({first: 1}))  # partly pruned already
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast = estimate_channel_curves(model, space, x, 5, batch_size=40, cache_dir=tmp_path, progress=False, bn_aware=True,
                                   measure=measure)
    plain = plain_channel_curves(model, space, x, 5, batch_size=40, bn_aware=True, measure=measure)
    stale = estimate_channel_curves(model, space, x, 5, batch_size=40, cache_dir=tmp_path, progress=False, measure=measure)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    for g in space.groups:
        scale = max(float(plain[g].distortion.max()), 1e-30)
        np.testing.assert_allclose(fast[g].distortion, plain[g].distortion, rtol=0, atol=1e-5 * scale)
        assert fast[g].distortion[0] == 0.0
    # The renormalised network is another network: the curves differ from the stale-statistics ones (and the
    # cache keeps them apart).
    assert any(not np.allclose(fast[g].distortion, stale[g].distortion) for g in space.groups)


def test_recalibrated_curves_refuse_several_batches_in_one_line():
    model = _resnet()
    x = torch.randn(20, 1, 28, 28)
    space = ChannelSpace(model, x[:1])
    with pytest.raises(ValueError, match="need the calibration inputs in one batch: 20 inputs came in 2 batches"):
        estimate_channel_curves(model, space, x, 3, batch_size=10, progress=False, bn_aware=True)
    with pytest.raises(UserError, match="set calibration.batch_size to at least calibration.size"):
        load_config(ROOT / "configs" / "quickstart_channels.yaml", ["prune.bn_aware_curves=true", "calibration.size=256",
                                                                   "calibration.batch_size=64"])


class TwoGroups(nn.Module):
    """conv a -> bn -> conv b -> pool -> linear: the groups of a (with its BatchNorm) and of b."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.b = nn.Conv2d(4, 3, 1)
        self.head = nn.Linear(3, 5)

    def forward(self, x):
        h = torch.relu(self.b(torch.relu(self.bn(self.a(x)))))
        return self.head(h.mean(dim=(2, 3)))


def _two_groups():
    torch.manual_seed(1)
    model = TwoGroups()
    model.bn.weight.data = torch.tensor([0.5, -2.0, 0.1, 1.0])
    model.bn.running_var.fill_(1.5)
    return model.eval()


def test_each_ranking_against_a_hand_computation():
    model = _two_groups()
    x, y = torch.randn(6, 2, 5, 5), torch.tensor([0, 1, 2, 3, 4, 0])
    space = ChannelSpace(model, x[:1])
    assert list(space.groups) == ["a", "b"]
    # l2: a's channel c is a.weight[c] and b.weight[:, c] together
    rank_channels(space, "l2")
    l2 = (model.a.weight.detach().pow(2).sum(dim=(1, 2, 3)) + model.b.weight.detach().pow(2).sum(dim=(0, 2, 3))).sqrt().double()
    torch.testing.assert_close(space.importance("a"), l2)
    # bn_scale: |gamma| of the group's BatchNorm; b's group has none and falls back to l2
    rank_channels(space, "bn_scale")
    torch.testing.assert_close(space.importance("a"), torch.tensor([0.5, 2.0, 0.1, 1.0], dtype=torch.float64))
    assert space.removal_order("a").tolist() == [2, 0, 3, 1]
    # taylor: |sum over samples and positions of activation x gradient| at a's and b's outputs, two batches summed
    acts = {}
    hooks = [getattr(model, n).register_forward_hook(lambda m, i, o, n=n: acts.__setitem__(n, o)) for n in "ab"]
    expected = {"a": 0, "b": 0}
    for xb, yb in ((x[:4], y[:4]), (x[4:], y[4:])):
        loss = nn.functional.cross_entropy(model(xb), yb)
        grads = torch.autograd.grad(loss, [acts["a"], acts["b"]])
        for name, g in zip("ab", grads):
            expected[name] = expected[name] + (acts[name] * g).sum(dim=(0, 2, 3)).abs().detach().double()
    for h in hooks:
        h.remove()
    rank_channels(space, "taylor", x, y, batch_size=4)
    for name in "ab":
        torch.testing.assert_close(space.importance(name), expected[name])
    assert all(p.grad is None for p in model.parameters())  # the gradients it took are gone
    # activation: a's channel c read by b (after the BatchNorm and ReLU): Var over samples and positions x |b.weight[:, c]|^2;
    # b's channel read by the head (after the mean over positions) likewise; two batches pooled
    with torch.no_grad():
        into_b = torch.relu(model.bn(model.a(x)))
        into_head = torch.relu(model.b(into_b)).mean(dim=(2, 3))
    var_b = into_b.double().transpose(0, 1).reshape(4, -1).var(dim=1, correction=0)
    var_head = into_head.double().var(dim=0, correction=0)
    rank_channels(space, "activation", x, batch_size=4)
    torch.testing.assert_close(space.importance("a"), var_b * model.b.weight.detach().double().pow(2).sum(dim=(0, 2, 3)))
    torch.testing.assert_close(space.importance("b"), var_head * model.head.weight.detach().double().pow(2).sum(dim=0))


@pytest.mark.parametrize("ranking", ["l2", "bn_scale", "taylor", "activation"])
def test_removed_channels_stay_first_whatever_the_ranking(ranking):
    model = _two_groups()
    x, y = torch.randn(8, 2, 5, 5), torch.arange(8) % 5
    space = ChannelSpace(model, x[:1])
    enforce_masks(space.layers, space.masks({"a": 0}))
    # remove channel 1 by hand: the one bn_scale ranks highest
    with torch.no_grad():
        model.a.weight[1] = 0
        model.a.bias[1] = 0
        model.b.weight[:, 1] = 0
    rank_channels(space, ranking, x, y, batch_size=8)
    assert space.removed("a") == 1 and space.removal_order("a")[0] == 1 and space.importance("a")[1] == 0
    masks = space.group_masks("a", 2)
    assert not masks["a"][1].any()  # level 2 keeps removing channel 1, plus the least important live one
    # The baselines follow the ranking too: unif on a's group removes the same channels RD's level would.
    cost = ChannelCost(space, "weights")
    removal = channel_baseline("unif", space, cost, 0.6 * cost.dense, {"a": 1, "b": 0})
    assert removal["a"] >= 1


def test_taylor_ranking_is_refused_without_labelled_data():
    with pytest.raises(UserError, match="prune.ranking 'taylor' needs labelled calibration images"):
        load_config(ROOT / "configs" / "quickstart_channels.yaml", ["prune.ranking=taylor", "calibration.source=synthetic"])
    with pytest.raises(UserError, match="prune.ranking 'taylor' is not offered at prune.granularity 'weight'"):
        load_config(ROOT / "configs" / "quickstart.yaml", ["prune.ranking=taylor"])
    with pytest.raises(UserError, match="prune.ranking must be one of 'l2', 'taylor', 'bn_scale', 'activation', got 'taylr'"):
        load_config(ROOT / "configs" / "quickstart_channels.yaml", ["prune.ranking=taylr"])


def test_run_directories_of_earlier_versions_resume_with_the_ranking_they_started_with(tmp_path):
    """A resume key written before prune.ranking existed ran with l2: it resumes under l2 (the old behaviour, whatever
    the default becomes) and refuses another ranking, the new default included, in one line that names the setting
    to resume with."""
    from rdprune.distributed import DistInfo
    from rdprune.pipeline.loop import _prepare_out_dir, resume_key, run_differences
    from rdprune.pipeline.run_dir import RunLayout, append_result

    config = ROOT / "configs" / "quickstart_channels.yaml"
    cfg = load_config(config, [f"run.out_dir={tmp_path}", "prune.ranking=l2"])
    old = resume_key(cfg)
    del old["prune"]["ranking"]
    assert run_differences(old, cfg) == []
    taylor = load_config(config, [f"run.out_dir={tmp_path}", "prune.ranking=taylor"])
    assert run_differences(old, taylor) == ["prune.ranking=l2"]
    default = load_config(config, [f"run.out_dir={tmp_path}"])
    assert default.prune.ranking == "activation" and run_differences(old, default) == ["prune.ranking=l2"]
    stored = resume_key(cfg)  # a run directory of the previous version, which resolved the default to l2
    assert run_differences(stored, default) == ["prune.ranking=l2"]
    (tmp_path / "resume_key.json").write_text(json.dumps(old))
    append_result(tmp_path, {"iteration": 0})
    with pytest.raises(UserError, match=r"holds a run of a different config \(it ran with prune.ranking=l2\); rerun with"):
        _prepare_out_dir(taylor, RunLayout(tmp_path), DistInfo())


def test_api_friction_a_new_user_met():
    """channel_baseline needs no current removal; plans and curves that disagree say so; one default grid."""
    from rdprune.granularity.channel.allocation import allocate_channels
    from rdprune.granularity.channel.curves import group_plan

    model = _two_groups()
    x = torch.randn(8, 2, 5, 5)
    space = ChannelSpace(model, x[:1])
    cost = ChannelCost(space, "weights")
    assert channel_baseline("unif", space, cost, 0.7 * cost.dense) == channel_baseline("unif", space, cost, 0.7 * cost.dense,
                                                                                       {g: 0 for g in space.groups})
    curves = estimate_channel_curves(model, space, x, progress=False)  # the default grid: 101 levels, every count
    assert len(curves["a"].amounts) == 4  # a has 4 channels: levels 0..3 (the floor keeps one)
    plans = {g: group_plan(space, g, 3, "relative") for g in space.groups}
    with pytest.raises(ValueError, match="the level plan of channel group 'a' has 3 levels but its curve has 4"):
        allocate_channels(curves, plans, cost, 0.7 * cost.dense)


def test_each_granularity_resolves_its_default_ranking_and_records_it():
    """A config that leaves prune.ranking out gets its granularity's default at load (so the resume key holds what
    ran); activation needs no labels, so zero-data pruning keeps the default."""
    assert load_config(ROOT / "configs" / "quickstart_channels.yaml").prune.ranking == "activation"
    assert load_config(ROOT / "configs" / "quickstart_channels.yaml", ["calibration.source=synthetic"]).prune.ranking == "activation"
    assert load_config(ROOT / "configs" / "quickstart.yaml").prune.ranking == "l2"
    with pytest.raises(UserError, match="prune.ranking 'activation' is not offered at prune.granularity 'weight'"):
        load_config(ROOT / "configs" / "quickstart.yaml", ["prune.ranking=activation"])
