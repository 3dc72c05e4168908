"""The run's plots name what they show: every curve its unit, every axis the unit's word."""
import numpy as np
import pytest

from rdprune.core.grid import Curve
from rdprune.pipeline.plots import (
    LEGEND_UNITS,
    curves_figure,
    layer_sparsity_figure,
    plot_curves,
    plot_layer_sparsity,
)


def _curves(names: list[str]) -> dict[str, Curve]:
    amounts = np.linspace(0, 0.9, 6)
    return {n: Curve(amounts, np.r_[0.0, (i + 1) * amounts[1:] ** 2]) for i, n in enumerate(names)}


def _legend_labels(ax) -> list[str]:
    return [t.get_text() for t in ax.get_legend().get_texts()]


def test_few_curves_share_one_axes_with_a_legend_of_unit_names_in_execution_order():
    order = ["features.0", "features.3", "head"]
    curves = _curves(list(reversed(order)) + ["not_in_order"])
    fig = curves_figure(curves, order, "RD curves", unit="channel group")
    (ax,) = fig.axes  # one axes: no colour bar of fractional indices
    assert _legend_labels(ax) == order  # only the units of the order, in its order
    assert ax.get_legend().get_title().get_text() == "channel group (execution order)"
    assert ax.get_xlabel() == "channel group sparsity (%)" and ax.get_ylabel() == "output distortion"
    assert ax.get_title() == "RD curves" and ax.get_yscale() == "log"
    x, y = ax.get_lines()[0].get_data()
    np.testing.assert_allclose(x, 100 * curves["features.0"].amounts)
    assert np.isnan(y[0]) and np.all(y[1:] > 0)  # zero distortion is left off the log axis
    assert len({line.get_color() for line in ax.get_lines()}) == 3  # told apart by colour, as the legend shows


def test_many_curves_get_one_panel_each_titled_by_the_unit_name():
    order = [f"blocks.{i}.mlp.fc1" for i in range(LEGEND_UNITS + 3)]
    fig = curves_figure(_curves(order), order, "RD curves, iter_03", unit="2:4 layer")
    panels = [ax for ax in fig.axes if ax.axison]
    assert [ax.get_title() for ax in panels] == order
    assert all(len(ax.get_lines()) == 1 and ax.get_legend() is None for ax in panels)
    assert fig.get_supxlabel() == "2:4 layer sparsity (%)"
    assert fig.get_suptitle().startswith("RD curves, iter_03") and "2:4 layer" in fig.get_suptitle()
    assert len(fig.axes) == 25  # 23 panels on a 5 x 5 grid, its two unused cells hidden


def test_layer_sparsity_names_the_unit_on_both_axes_and_each_unit_on_a_tick():
    order = ["conv1", "conv2", "fc"]
    allocations = [{"conv1": 0.2, "conv2": 0.5, "fc": 0.1}, {"conv1": 0.4, "conv2": 0.8, "fc": 0.3}]
    fig = layer_sparsity_figure(allocations, order, "per-layer sparsity", unit="channel group")
    (ax,) = fig.axes
    assert ax.get_xlabel() == "channel group (execution order)" and ax.get_ylabel() == "channel group sparsity (%)"
    assert [t.get_text() for t in ax.get_xticklabels()] == order
    assert _legend_labels(ax) == ["iteration 1", "iteration 2"]
    np.testing.assert_allclose(ax.get_lines()[1].get_ydata(), [40, 80, 30])


def test_the_old_calls_still_save_pngs_and_default_to_layers(tmp_path):
    order = ["a", "b"]
    fig = plot_curves(_curves(order), order, tmp_path / "plots" / "rd_curves.png", "RD curves")
    assert fig.axes[0].get_xlabel() == "layer sparsity (%)" and _legend_labels(fig.axes[0]) == order
    fig = plot_layer_sparsity([{"a": 0.5, "b": 0.25}], order, tmp_path / "plots" / "layer_sparsity.png", "sparsity")
    assert fig.axes[0].get_xlabel() == "layer (execution order)" and fig.axes[0].get_ylabel() == "layer sparsity (%)"
    many = [f"l{i}" for i in range(LEGEND_UNITS + 1)]
    plot_curves(_curves(many), many, tmp_path / "plots" / "many.png", "RD curves")
    for name in ("rd_curves", "layer_sparsity", "many"):
        assert (tmp_path / "plots" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("count", [LEGEND_UNITS, LEGEND_UNITS + 1])
def test_legend_up_to_the_limit_panels_past_it(count):
    order = [f"l{i}" for i in range(count)]
    fig = curves_figure(_curves(order), order, "t")
    assert (len(fig.axes) == 1) == (count <= LEGEND_UNITS)
