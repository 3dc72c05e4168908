"""The output distortion of the curves: mse and kl (each averaged over samples, or its worst sample)."""
import numpy as np
import pytest
import torch
from torch import nn

from rdprune.core.curves import estimate_curves
from rdprune.core.distortion import Distortion


def _hand_kl(reference: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """KL(softmax(reference) || softmax(out)) of each sample, written out term by term."""
    p = torch.softmax(reference.double(), dim=1)
    return (p * (p.log() - torch.softmax(out.double(), dim=1).log())).sum(dim=1)


def test_kl_is_the_divergence_of_the_softmax_outputs_per_sample():
    torch.manual_seed(0)
    reference, out = torch.randn(7, 5), torch.randn(7, 5)
    per_sample = _hand_kl(reference, out)
    assert torch.allclose(Distortion("kl").per_sample(reference, out), per_sample)
    assert Distortion("kl").measured(reference, out) == pytest.approx(float(per_sample.mean()))
    assert Distortion("kl", worst_case=True).measured(reference, out) == pytest.approx(float(per_sample.max()))
    assert float(Distortion("kl").batch(reference, out)) == pytest.approx(float(per_sample.sum()))
    # A shift of every logit moves no prediction: kl sees nothing, mse sees it all.
    assert Distortion("kl").measured(reference, reference + 3.0) == pytest.approx(0.0, abs=1e-12)
    assert Distortion("mse").measured(reference, reference + 3.0) == pytest.approx(9.0)


def test_kl_of_dense_outputs_averages_the_positions_of_each_sample():
    torch.manual_seed(1)
    reference, out = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    by_position = _hand_kl(reference, out).reshape(3, -1).mean(dim=1)
    assert torch.allclose(Distortion("kl").per_sample(reference, out), by_position)


def test_the_squared_error_is_unchanged():
    torch.manual_seed(2)
    reference, out = torch.randn(6, 3), torch.randn(6, 3)
    err = (out.double() - reference.double()) ** 2
    assert Distortion.named("mse").measured(reference, out) == pytest.approx(float(err.mean()))
    assert Distortion.named("worst_case").measured(reference, out) == pytest.approx(float(err.mean(dim=1).max()))
    assert Distortion.named("mse").cache_key == "worst_case=False"  # curves cached before kl existed stay valid
    assert Distortion.named("worst_case").cache_key == "worst_case=True"
    assert Distortion.named("kl") == Distortion("kl", worst_case=False)


def test_kl_needs_class_outputs_and_a_known_measure():
    with pytest.raises(ValueError, match=r"kl distortion needs outputs of shape \(batch, classes, ...\), got shape \(4,\)"):
        Distortion("kl").per_sample(torch.zeros(4), torch.zeros(4))
    with pytest.raises(ValueError, match="unknown distortion measure 'l1'; choose one of mse, kl"):
        Distortion("l1")


def test_kl_curves_are_cached_apart_from_mse_curves(tmp_path):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
    x = torch.randn(16, 6)
    mse = estimate_curves(model, x, 5, cache_dir=tmp_path, progress=False)
    kl = estimate_curves(model, x, 5, cache_dir=tmp_path, measure="kl", progress=False)
    assert all(not np.allclose(mse[n].distortion, kl[n].distortion) for n in mse)
    again = estimate_curves(model, x, 5, cache_dir=tmp_path, measure="kl", progress=False)
    assert all(np.array_equal(again[n].distortion, kl[n].distortion) for n in kl)
