"""Curves of models fx cannot trace: the modules that run before a layer answer from a record of the
unpruned pass, and every case where that would be wrong falls back, with the same curves as the plain loop."""
import logging

import numpy as np
import pytest
import torch
from torch import nn

from rdprune.core.curves import estimate_curves, plain_curves
from rdprune.core.replay import ModuleReplay

from tiny_models import UntraceableResNet


def _curves_equal_the_plain_loop(model, caplog):
    torch.manual_seed(1)
    x = torch.randn(12, 3, 8, 8)
    with caplog.at_level(logging.WARNING, logger="rdprune.core.curves"):
        fast = estimate_curves(model, x, levels=5, batch_size=6, progress=False)
    plain = plain_curves(model, x, levels=5, batch_size=6)
    assert list(fast) == list(plain)
    for name, curve in plain.items():
        assert np.array_equal(fast[name].distortion, curve.distortion), name
    return caplog.text


@pytest.fixture
def model():
    torch.manual_seed(0)
    return UntraceableResNet().eval()


def test_a_layer_replays_the_largest_modules_that_finish_before_it(model):
    replay = ModuleReplay(model, torch.randn(2, 3, 8, 8))
    assert replay.replayable((model.stem,)) == []
    assert replay.replayable((model.blocks[1].conv2,)) == ["stem", "blocks.0", "blocks.1.conv1", "blocks.1.act"]
    assert replay.replayable((model.head,)) == ["stem", "blocks.0", "blocks.1", "blocks.2", "early", "late"]  # a ModuleList is never called
    assert replay.replayable((model.blocks[2].conv1, model.early)) == ["stem", "blocks.0", "blocks.1"]


def test_untraceable_model_curves_equal_the_plain_loop(model, caplog):
    log = _curves_equal_the_plain_loop(model, caplog)
    assert "cannot be traced by torch.fx" in log and "by replaying, for each layer, the outputs of the modules" in log
    assert "plain loop" not in log


def test_a_module_called_twice_or_sharing_the_weight_is_not_replayed(caplog):
    torch.manual_seed(0)
    shared = UntraceableResNet(shared_block=True).eval()
    replay = ModuleReplay(shared, torch.randn(2, 3, 8, 8))
    assert "blocks.0" not in replay.replayable((shared.blocks[1].conv2,))  # called again after it
    assert replay.replayable((shared.head,)) == ["stem", "blocks.1", "early", "late"]
    _curves_equal_the_plain_loop(shared, caplog)

    tied = UntraceableResNet(tied=True).eval()
    replay = ModuleReplay(tied, torch.randn(2, 3, 8, 8))
    assert "early" not in replay.replayable((tied.late,))  # its output depends on the pruned weight too
    _curves_equal_the_plain_loop(tied, caplog)


def test_an_output_changed_in_place_downstream_falls_back_to_the_plain_loop(caplog):
    torch.manual_seed(0)
    log = _curves_equal_the_plain_loop(UntraceableResNet(in_place=True).eval(), caplog)
    assert "is changed in place after it is computed; using the plain loop for it" in log


def test_an_instance_level_forward_set_by_another_library_is_put_back(model, caplog):
    original = model.blocks[0].forward

    def wrapped(*args, **kwargs):  # as accelerate's hooks wrap a module's forward on the instance
        return original(*args, **kwargs)

    model.blocks[0].forward = wrapped
    _curves_equal_the_plain_loop(model, caplog)
    assert model.blocks[0].__dict__["forward"] is wrapped
    assert all("forward" not in m.__dict__ for n, m in model.named_modules() if n != "blocks.0")


def _untraceable(forward):
    """A three-Linear model (a, b, head) with the given forward, which fx cannot trace."""
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.head = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 3)
            self.threshold = float("inf")

        def forward(self, x):
            if x.shape[1] != 4:
                raise ValueError("four features")
            return forward(self, x)
    torch.manual_seed(0)
    return Model().eval()


def _exact(model, x, caplog, batch_size=64):
    with caplog.at_level(logging.WARNING, logger="rdprune.core.curves"):
        fast = estimate_curves(model, x, levels=5, batch_size=batch_size, progress=False)
    plain = plain_curves(model, x, levels=5, batch_size=batch_size)
    for name, curve in plain.items():
        np.testing.assert_allclose(fast[name].distortion, curve.distortion, rtol=1e-6, atol=0, err_msg=name)
    return caplog.text


def test_a_call_order_that_changes_with_the_batch_is_caught(caplog):
    model = _untraceable(lambda m, x: m.head(m.b(m.a(x)) if x[0, 0] > 0 else m.a(m.b(x))))
    x = torch.randn(8, 4)
    x[0, 0], x[4, 0] = 1.0, -1.0  # the second batch calls b first
    assert "runs after the pruned layer on this batch; using the plain loop" in _exact(model, x, caplog, batch_size=4)


def test_control_flow_that_pruning_changes_is_caught(caplog):
    def forward(m, x):
        h = m.b(m.a(x))
        return m.head(m.a(h) if h.norm() < m.threshold else h)  # a second call of a once b is pruned enough
    model = _untraceable(forward)
    with torch.no_grad():
        model.threshold = 0.97 * float(model.b(model.a(torch.randn(8, 4, generator=torch.Generator().manual_seed(5)))).norm())
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(5))
    assert "is called again, or after the pruned layer, once that layer is pruned" in _exact(model, x, caplog)


def test_a_weight_read_before_its_layer_is_called_is_caught(caplog):
    model = _untraceable(lambda m, x: m.head(m.b(m.a(torch.nn.functional.linear(x, m.b.weight)))))  # read before b runs
    assert "a weight of the pruned layer is read before the layer is called" in _exact(model, torch.randn(8, 4), caplog)


def test_reading_only_the_weight_s_dtype_and_shape_early_keeps_the_replay(caplog):
    def forward(m, x):  # as transformers' ViT checks the input against its projection's dtype
        if x.dtype != m.b.weight.dtype or x.shape[1] != m.b.weight.shape[1]:
            raise TypeError("input does not fit")
        return m.head(m.b(m.a(x)))
    assert "plain loop" not in _exact(_untraceable(forward), torch.randn(8, 4), caplog)


class Noting(nn.Module):
    """Writes into a list its caller passes and reads afterwards: answering from the record skips the write."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x, notes):
        h = self.linear(x)
        notes.append(h.mean())
        return h


def test_a_module_the_replay_disturbs_falls_back_instead_of_failing(caplog):
    def forward(m, x):
        notes = []
        return m.head(m.b(m.a(x, notes))) + notes[0]
    model = _untraceable(forward)
    model.a = Noting()
    assert "replaying the modules that run before it fails (list index out of range); using the plain loop" in _exact(
        model, torch.randn(8, 4), caplog)


class CountingConv(nn.Conv2d):
    calls = 0

    def forward(self, x):
        CountingConv.calls += 1
        return super().forward(x)


def test_replay_computes_the_replayed_modules_once_per_layer_and_batch(model):
    """The point of the replay: the stem computes once per layer and batch (to record), not once per level."""
    model.stem = CountingConv(3, 8, 3, padding=1)
    CountingConv.calls = 0
    curves = estimate_curves(model, torch.randn(12, 3, 8, 8), levels=9, batch_size=6, progress=False)
    batches, units, levels = 2, len(curves), len(curves["stem"].amounts)
    assert units == 10 and CountingConv.calls < units * levels * batches / 4  # the plain loop's count, and far below it
    # the stem's own levels, one record per other layer and batch, the references, fx's attempt and the call structure
    assert CountingConv.calls <= levels * batches + (units - 1) * batches + batches + 2
