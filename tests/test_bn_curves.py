"""BatchNorm-aware curves: against their plain definition, zero at level 0, cached apart, and the fallback."""
import logging

import numpy as np
import pytest
import torch

from rdprune.core.batchnorm import batchnorm_layers
from rdprune.core.curves import estimate_curves, plain_curves
from rdprune.core.layers import prunable_layers
from rdprune.core.masks import apply_masks
from rdprune.models.cifar_resnet import resnet20

pytestmark = pytest.mark.usefixtures("one_thread")

LAYERS = ["conv1", "layer1.0.conv1", "layer2.0.conv2", "layer3.2.conv1", "fc"]


def _model(pruned: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    model = resnet20(10, in_channels=1)
    for bn in batchnorm_layers(model).values():  # statistics that do not fit the calibration inputs
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    if pruned:
        apply_masks(model, {n: 0.5 for n in prunable_layers(model)})
    return model.eval()


def _close(a, b):
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name].amounts, b[name].amounts)
        scale = max(float(np.abs(b[name].distortion).max()), 1e-12)
        np.testing.assert_allclose(a[name].distortion, b[name].distortion, rtol=0, atol=1e-5 * scale, err_msg=name)


@pytest.mark.parametrize("worst_case", [False, True])
@pytest.mark.parametrize("pruned", [False, True])
def test_one_batch_fast_path_matches_the_plain_definition(worst_case, pruned):
    model, x = _model(pruned), torch.randn(48, 1, 28, 28)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fast = estimate_curves(model, x, 6, grid="absolute", worst_case=worst_case, layers=LAYERS, batch_size=48,
                           bn_aware=True, progress=False)
    plain = plain_curves(model, x, 6, grid="absolute", worst_case=worst_case, layers=LAYERS, batch_size=48, bn_aware=True)
    _close(fast, plain)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())  # weights and statistics restored
    for name in LAYERS:
        assert fast[name].distortion[0] == 0.0 and plain[name].distortion[0] == 0.0  # level 0 is the reference
    stale = estimate_curves(model, x, 6, grid="absolute", worst_case=worst_case, layers=LAYERS, batch_size=48, progress=False)
    assert any(not np.allclose(stale[n].distortion, fast[n].distortion, rtol=1e-2) for n in LAYERS)


def test_several_batches_fall_back_to_the_plain_definition_with_a_warning(caplog):
    model, x = _model(True), torch.randn(40, 1, 28, 28)
    with caplog.at_level(logging.WARNING, logger="rdprune.core.curves"):
        curves = estimate_curves(model, x, 5, layers=LAYERS[:2], batch_size=16, bn_aware=True, progress=False)
    assert [r.getMessage() for r in caplog.records if "BatchNorm-aware curves" in r.getMessage()], caplog.text
    _close(curves, plain_curves(model, x, 5, layers=LAYERS[:2], batch_size=16, bn_aware=True))
    one_batch = estimate_curves(model, x, 5, layers=LAYERS[:2], batch_size=40, bn_aware=True, progress=False)
    _close(curves, one_batch)  # per-layer statistics over the whole set either way


def test_bn_aware_curves_are_cached_apart_from_stale_ones(tmp_path):
    model, x = _model(), torch.randn(32, 1, 28, 28)
    aware = estimate_curves(model, x, 4, layers=LAYERS[:2], batch_size=32, bn_aware=True, cache_dir=tmp_path, progress=False)
    stale = estimate_curves(model, x, 4, layers=LAYERS[:2], batch_size=32, cache_dir=tmp_path, progress=False)
    assert not np.allclose(aware["conv1"].distortion, stale["conv1"].distortion)
    again = estimate_curves(model, x, 4, layers=LAYERS[:2], batch_size=32, bn_aware=True, cache_dir=tmp_path, progress=False)
    _close(again, aware)


def test_a_model_without_batchnorm_gets_its_ordinary_curves():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(216, 4)).eval()
    x = torch.randn(8, 3, 8, 8)
    _close(estimate_curves(model, x, 5, bn_aware=True, progress=False), estimate_curves(model, x, 5, progress=False))
