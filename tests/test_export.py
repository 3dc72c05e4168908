"""Physical channel removal (checked against masking) and the portable export (checked by loading it back)."""
import copy
import sys

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from rdprune.errors import UserError
from rdprune.granularity.channel import export
from rdprune.granularity.channel.export import remove_channels, require_torch_pruning, save_exported

from tiny_models import Branchy

tp = pytest.importorskip("torch_pruning")
pytest.importorskip("onnxruntime")


def resnet18() -> nn.Module:
    torch.manual_seed(0)
    return _random_bn(torchvision.models.resnet18(num_classes=10)).eval()


def branchy() -> nn.Module:
    torch.manual_seed(0)
    return _random_bn(Branchy()).eval()


def _random_bn(model: nn.Module) -> nn.Module:
    """Give every BatchNorm non-trivial statistics and affine parameters, so masking a channel matters."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model


class PadShortcut(nn.Module):
    """A CIFAR-style residual stage whose shortcut zero-pads 16 channels to 64: torch-pruning treats F.pad as channel-wise."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.inner = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.conv = nn.Conv2d(32, 64, 3, padding=1)
        self.fc = nn.Linear(64, 4)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        y = self.conv(torch.relu(self.inner(x)))
        shortcut = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 24, 24))
        return self.fc(torch.relu(y + shortcut).mean((2, 3)))


class Detached(nn.Module):
    """The second conv reads a detached tensor, so torch-pruning's autograd trace misses that it consumes the first."""

    def __init__(self):
        super().__init__()
        self.first = nn.Conv2d(3, 8, 3)
        self.second = nn.Conv2d(8, 4, 3)
        self.third = nn.Conv2d(8, 4, 3)
        self.probe = nn.Conv2d(3, 4, 5)  # only its detached output is used: autograd never reaches it

    def forward(self, x):
        y = self.first(x)
        return (self.third(y) + self.second(y.detach()) + self.probe(x).detach()).mean((2, 3))


class ConstantScale(nn.Module):
    """Multiplies by a constant per-channel tensor that no pruning handler knows about."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.register_buffer("scale", torch.linspace(0.5, 1.5, 8).view(1, 8, 1, 1))

    def forward(self, x):
        return (self.conv(x) * self.scale).mean((2, 3))


class LayerScale(nn.Module):
    """A bare per-channel nn.Parameter (torch-pruning prunes it as an unwrapped parameter)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 8).view(1, 8, 1, 1))
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc((self.conv(x) * self.scale).mean((2, 3)))


X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
X_SMALL = X[:, :, :8, :8]


# ------------------------------------------------------------------------------------------------- masked reference


def masked_reference(model: nn.Module, example: torch.Tensor, removal: dict) -> nn.Module:
    """A copy of ``model`` with every slice that each root's torch-pruning group would remove set to zero."""
    masked = copy.deepcopy(model).eval()
    graph = tp.DependencyGraph().build_dependency(masked, example_inputs=example, verbose=False)
    modules = dict(masked.named_modules())
    for name, idxs in removal.items():
        layer = modules[name]
        group = graph.get_pruning_group(layer, graph.get_pruner_of_module(layer).prune_out_channels, idxs)
        for dep, dep_idxs in group:
            _zero_slice(graph, dep, list(dep_idxs))
    return masked


@torch.no_grad()
def _zero_slice(graph, dep, idxs: list) -> None:
    """Zero what the dep's handler would remove: output rows (and bias, BN affine) or input columns."""
    target = dep.target.module
    if isinstance(target, nn.Parameter):
        target.index_fill_(dep.target.pruning_dim, torch.tensor(idxs), 0.0)
    elif graph.is_out_channel_pruning_fn(dep.handler) and isinstance(target, (nn.Conv2d, nn.Linear, nn.BatchNorm2d)):
        target.weight[idxs] = 0.0
        if target.bias is not None:
            target.bias[idxs] = 0.0
    elif graph.is_in_channel_pruning_fn(dep.handler) and isinstance(target, (nn.Conv2d, nn.Linear)):
        groups = getattr(target, "groups", 1)
        per_group_in, per_group_out = target.weight.shape[1], target.weight.shape[0] // groups
        for i in idxs:
            g = i // per_group_in
            target.weight[g * per_group_out:(g + 1) * per_group_out, i % per_group_in] = 0.0


def assert_relative_close(got: torch.Tensor, want: torch.Tensor, tolerance: float) -> None:
    error = (got - want).abs().max().item() / want.abs().max().item()
    assert error <= tolerance, f"relative error {error:.3g} > {tolerance}"


# ---------------------------------------------------------------------------------------------------------- removal


def test_missing_torch_pruning_is_a_user_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_pruning", None)
    with pytest.raises(UserError, match=r"prune.granularity channel needs the optional dependency torch-pruning: "
                                        r"pip install 'rdprune\[channels\]'"):
        require_torch_pruning()


def test_block_conv_loses_outputs_and_next_conv_inputs(one_thread):
    model = resnet18()
    before = copy.deepcopy(model.state_dict())
    pruned = remove_channels(model, X, {"layer1.0.conv1": [0, 7, 63]})
    assert (pruned.layer1[0].conv1.out_channels, pruned.layer1[0].bn1.num_features, pruned.layer1[0].conv2.in_channels) == (61, 61, 61)
    assert pruned.layer1[0].conv2.out_channels == 64 and pruned.layer1[1].conv1.out_channels == 64
    assert not pruned.training
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items()), "the original must not change"
    assert model.layer1[0].conv1.out_channels == 64


def test_residual_stream_shrinks_every_coupled_layer(one_thread):
    pruned = remove_channels(resnet18(), X, {"layer4.1.conv2": [1, 2, 3], "conv1": [5]})
    stream4 = [pruned.layer4[0].conv2.out_channels, pruned.layer4[0].bn2.num_features, pruned.layer4[0].downsample[0].out_channels,
               pruned.layer4[0].downsample[1].num_features, pruned.layer4[1].conv1.in_channels, pruned.layer4[1].conv2.out_channels,
               pruned.layer4[1].bn2.num_features, pruned.fc.in_features]
    assert stream4 == [509] * 8
    stream1 = [pruned.conv1.out_channels, pruned.bn1.num_features, pruned.layer1[0].conv1.in_channels, pruned.layer1[0].conv2.out_channels,
               pruned.layer1[1].conv2.out_channels, pruned.layer2[0].conv1.in_channels, pruned.layer2[0].downsample[0].in_channels]
    assert stream1 == [63] * 7
    assert pruned.layer4[0].conv1.out_channels == 512 and pruned(X).shape == (2, 10)


EQUIVALENCE_CASES = {
    # several groups at once: block-internal, the stem's stream, and the last stream (which reaches fc)
    "resnet18": (resnet18, X, {"layer1.0.conv1": [0, 7], "conv1": [3, 4, 60], "layer4.1.conv2": list(range(0, 512, 5)),
                               "layer3.0.conv1": [1]}),
    # two groups feeding one concatenation (head's input slices [1, 4] and [16 + 0, 16 + 5]), a depthwise conv, a grouped
    # conv losing one input and one output per group, a residual add, BatchNorm
    "branchy": (branchy, X_SMALL, {"left": [1, 4], "stem": [0, 5]}),
    # the grouped conv loses the same local input in both groups; pruning the two groups one after the other would
    # remove the wrong head inputs for the second (0.94 relative error): the first renumbers head's inputs
    "branchy_two_groups_one_concat": (branchy, X_SMALL, {"left": [1, 4], "stem": [0, 4]}),
    "branchy_concat_only": (branchy, X_SMALL, {"left": list(range(0, 16, 2))}),
    "layer_scale": (lambda: LayerScale().eval(), X_SMALL, {"conv": [0, 6]}),
}


@pytest.mark.parametrize("case", sorted(EQUIVALENCE_CASES))
def test_removal_equals_masking(case, one_thread):
    build, example, removal = EQUIVALENCE_CASES[case]
    model = build()
    pruned = remove_channels(model, example, removal)
    masked = masked_reference(model, example, removal)
    with torch.no_grad():
        assert_relative_close(pruned(example), masked(example), 1e-5)
        assert (pruned(example) - model(example)).abs().max() > 1e-4, "the removal should change the output"
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())


def test_unknown_root_is_named():
    with pytest.raises(ValueError, match=r"not in the model: \['layer9.conv'\]"):
        remove_channels(resnet18(), X, {"layer1.0.conv1": [0], "layer9.conv": [0]})


def test_out_of_range_index_is_named():
    with pytest.raises(ValueError, match=r"indices \[64\] of layer 'layer1.0.conv1' are out of range: it has 64 output"):
        remove_channels(resnet18(), X, {"layer1.0.conv1": [0, 64]})


def test_root_must_be_conv_or_linear():
    with pytest.raises(ValueError, match=r"'bn1' is a BatchNorm2d, not an nn.Conv2d or nn.Linear"):
        remove_channels(resnet18(), X, {"bn1": [0]})


def test_emptying_a_group_is_refused():
    with pytest.raises(ValueError, match=r"would leave layer 'layer1.0.conv1' with no channel \(all 64 removed\)"):
        remove_channels(resnet18(), X, {"layer1.0.conv1": range(64)})


def test_emptying_a_group_through_another_root_is_refused():
    """conv1 and layer1.0.conv2 are one group: between them they remove all of its 64 channels."""
    with pytest.raises(ValueError, match=r"with no channel \(all 64 removed\)"):
        remove_channels(resnet18(), X, {"conv1": range(32), "layer1.0.conv2": range(32, 64)})


def test_unbalanced_grouped_conv_is_refused():
    with pytest.raises(ValueError, match=r"\[2, 0\] channels from the 2 groups of grouped convolution layer 'right'"):
        remove_channels(branchy(), X_SMALL, {"stem": [0, 3]})


@pytest.mark.parametrize("root", ["stem", "conv"])
def test_channel_padding_shortcut_is_refused(root):
    """The copy would run, with the right shapes, and compute something else: the check must come before pruning."""
    with pytest.raises(ValueError, match=r"passes through ConstantPadNdBackward0, which maps 16 channels to 64"):
        remove_channels(PadShortcut().eval(), X_SMALL, {root: [15]})


def test_channel_padding_shortcut_elsewhere_is_fine():
    pruned = remove_channels(PadShortcut().eval(), X_SMALL, {"inner": [3, 9]})
    assert pruned.inner.out_channels == 30 and pruned.conv.in_channels == 30


def test_untraced_consumer_is_named():
    with pytest.raises(ValueError, match=r"inconsistent: layer 'second' expects 8 input channels but gets 6"):
        remove_channels(Detached().eval(), X_SMALL, {"first": [0, 1]})


def test_root_outside_the_graph_is_named():
    with pytest.raises(ValueError, match=r"layer 'probe' is not in torch-pruning's dependency graph"):
        remove_channels(Detached().eval(), X_SMALL, {"probe": [0]})


def test_torch_error_is_one_line():
    with pytest.raises(ValueError, match=r"fails on the example input: The size of tensor a \(6\) must match") as info:
        remove_channels(ConstantScale().eval(), X_SMALL, {"conv": [0, 1]})
    assert "\n" not in str(info.value)


def test_removing_model_outputs_is_refused():
    with pytest.raises(ValueError, match=r"output shapes \(2, 8\) differ from the original's \(2, 10\)"):
        remove_channels(resnet18(), X, {"fc": [0, 1]})


# ----------------------------------------------------------------------------------------------------------- export


def test_export_round_trip(tmp_path, one_thread):
    model = remove_channels(resnet18(), X, {"layer1.0.conv1": [0, 7], "conv1": [3, 4]})
    example = X[:1]
    paths = save_exported(model, example, tmp_path / "out")
    assert paths == {"torch_export": tmp_path / "out" / "model.pt2", "onnx": tmp_path / "out" / "model.onnx"}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model.onnx", "model.pt2"], "no temporary files left"

    loaded = torch.export.load(paths["torch_export"]).module()
    batch3 = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for x in (example, batch3):
            assert_relative_close(loaded(x), model(x), 1e-6)

    import onnxruntime

    session = onnxruntime.InferenceSession(str(paths["onnx"]), providers=["CPUExecutionProvider"])
    for x in (example, batch3):  # the batch is dynamic: traced at 2, checked at 1, run here at 3
        got = torch.from_numpy(session.run(None, {"input": x.numpy()})[0])
        with torch.no_grad():
            assert (got - model(x)).abs().max() <= 1e-4


def test_failed_onnx_check_leaves_no_file(tmp_path, monkeypatch):
    monkeypatch.setattr(export, "ONNX_TOLERANCE", -1.0)
    with pytest.raises(RuntimeError, match=r"the ONNX model's output 0 differs from PyTorch's"):
        save_exported(branchy(), X_SMALL, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt2"]


def test_missing_onnxruntime_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(UserError, match=r"onnxruntime is missing.*pip install 'rdprune\[channels\]'"):
        save_exported(branchy(), X_SMALL, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_training_mode(tmp_path):
    with pytest.raises(ValueError, match="eval mode"):
        save_exported(branchy().train(), X_SMALL, tmp_path)
