"""Torch-Pruning's own pruners as channel baselines: the channels they name are what Torch-Pruning itself removes,
the budget is met on rdprune's counter, and the methods run through the pipeline."""
import copy
import sys

import pytest
import torch

from rdprune.core.layers import layer_flops
from rdprune.granularity.channel.costs import ChannelCost
from rdprune.granularity.channel.peers import PEERS, PeerPruner, peer_channels
from rdprune.granularity.channel.space import ChannelSpace
from rdprune.models.cifar_resnet import resnet20

from launch import REPO, read_rows, run_ok
from tiny_models import lived_in

pytestmark = pytest.mark.usefixtures("one_thread")
tp = pytest.importorskip("torch_pruning")


def _resnet():
    return lived_in(resnet20(10, in_channels=1, shortcut="projection"))


@pytest.mark.parametrize("method", ["tp_l2", "tp_l2_global", "tp_bn_scale_global"])
def test_masked_channels_are_what_torch_pruning_itself_removes(method):
    model = _resnet()
    x = torch.randn(4, 1, 28, 28)
    space = ChannelSpace(model, x[:1])
    pruner = PeerPruner(method, space, x[:1], [space.output_layer], max_ratio=1.0)
    assert sum(map(len, pruner.channels(0.5).values())) > sum(map(len, pruner.channels(0.2).values()))
    chosen = pruner.channels(0.3)  # one pruner re-targeted: the same channels as a fresh Torch-Pruning run
    assert sum(map(len, chosen.values())) > 0
    masked = copy.deepcopy(model)
    masked_space = ChannelSpace(masked, x[:1])
    for name, mask in masked_space.channel_masks(chosen).items():
        masked_space.layers[name].weight.data *= mask
    # Torch-Pruning on its own: the same ratio, pruned physically by group.prune()
    physical = copy.deepcopy(model).eval()
    importance, global_pruning = PEERS[method]
    imp = {"l2": lambda: tp.importance.MagnitudeImportance(p=2), "bn_scale": tp.importance.BNScaleImportance}[importance]()
    theirs = tp.pruner.MetaPruner(physical, x[:1], importance=imp, global_pruning=global_pruning, pruning_ratio=0.3,
                                  ignored_layers=[physical.fc])
    theirs.step()
    assert sum(p.numel() for p in physical.parameters()) < sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        torch.testing.assert_close(masked.eval()(x), physical(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["tp_l2", "tp_taylor_global"])
def test_a_peer_meets_the_flops_budget_on_rdprunes_counter(method):
    model = _resnet()
    x, y = torch.randn(32, 1, 28, 28), torch.arange(32) % 10
    space = ChannelSpace(model, x[:1], min_density=0.1)
    cost = ChannelCost(space, "flops", flops=layer_flops(model, space.layers, (1, 28, 28)))
    limit = 0.5 * cost.dense
    chosen = peer_channels(method, space, cost, limit, x[:1], [space.output_layer], 0.1, x, y, batch_size=16)
    spent = cost({g: len(c) for g, c in chosen.items()})
    assert spent <= limit and spent > 0.4 * cost.dense  # met, and not by pruning far past it
    assert all(len(c) <= space.max_removed(g) for g, c in chosen.items())  # floors hold
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.slow
def test_a_peer_method_runs_through_the_pipeline(tmp_path):
    """Torch-Pruning's Taylor pruner (calibration images and labels) at a FLOPs budget: the budget met on rdprune's
    counter, BatchNorm recalibrated, fine-tuned, the smaller model exported."""
    out = tmp_path / "run"
    run_ok([sys.executable, "-m", "rdprune.run", str(REPO / "configs" / "quickstart_channels.yaml"), f"run.out_dir={out}",
            "model.checkpoint=null", "pretrain.steps=30", "finetune.steps=4", "prune.budget=flops", "prune.target_sparsity=0.5",
            "prune.amount_per_iteration=1.0", "prune.method=tp_taylor_global", "calibration.size=64", "calibration.batch_size=64",
            "calibration.bn_images=128", "run.progress=false", "run.threads=1"])
    row = read_rows(out)[-1]
    assert row["method"] == "tp_taylor_global" and 1 - row["flops_remaining"] >= 0.5 - 1e-9 and row["cost_remaining"] <= 0.5
    assert (out / "final" / "smaller" / "model.onnx").exists()
