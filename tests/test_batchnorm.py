"""BatchNorm recalibration against a plain reference, its defining property, and across ranks."""
import pytest
import torch
from torch import nn

from rdprune.core.batchnorm import batchnorm_layers, recalibrate_batchnorm
from rdprune.core.layers import prunable_layers
from rdprune.core.masks import apply_masks
from rdprune.models.cifar_resnet import resnet20

from launch import REPO, SCRIPTS, torchrun


def _pruned_resnet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = resnet20(10, in_channels=1)
    for bn in batchnorm_layers(model).values():  # stale statistics, unlike the fresh default ones
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.5, 0.5)
    apply_masks(model, {n: 0.6 for n in prunable_layers(model)})
    return model


def _plain_reference(model: nn.Module, images: torch.Tensor) -> None:
    """By definition: for each BatchNorm in execution order, run the whole set at once in eval mode
    and set its statistics to the mean and unbiased variance of its input."""
    model.eval()
    order, seen = [], {}
    hooks = [m.register_forward_pre_hook(lambda _m, _x, n=n: order.append(n) if n not in order else None)
             for n, m in batchnorm_layers(model).items()]
    model(images[:2])
    for h in hooks:
        h.remove()
    for name in order:
        bn = batchnorm_layers(model)[name]
        hook = bn.register_forward_pre_hook(lambda _m, args: seen.__setitem__("x", args[0]))
        with torch.no_grad():
            model(images)
        hook.remove()
        x = seen["x"].double().transpose(0, 1).flatten(1)
        var, mean = torch.var_mean(x, dim=1, unbiased=True)
        bn.running_mean.copy_(mean.float())
        bn.running_var.copy_(var.float())


@pytest.mark.parametrize("batch_size", [300, 64])  # one pass over one batch; layer by layer over batches
def test_recalibration_equals_the_plain_definition(one_thread, batch_size):
    images = torch.randn(300, 1, 28, 28)
    model, reference = _pruned_resnet(), _pruned_resnet()
    reference.train()
    _plain_reference(reference, images)
    model.train()
    names = recalibrate_batchnorm(model, images, batch_size=batch_size)
    assert len(names) == 19 and names[0] == "bn1"
    assert model.training and all(m.training for m in model.modules())  # modes restored
    for name, bn in batchnorm_layers(model).items():
        ref = batchnorm_layers(reference)[name]
        torch.testing.assert_close(bn.running_mean, ref.running_mean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(bn.running_var, ref.running_var, rtol=1e-4, atol=1e-5)


def test_recalibrated_layers_normalise_their_inputs_exactly(one_thread):
    images = torch.randn(256, 1, 28, 28)
    model = _pruned_resnet(1)
    recalibrate_batchnorm(model, images, batch_size=100)
    model.eval()
    outputs = {}
    hooks = [m.register_forward_hook(lambda _m, _x, y, n=n: outputs.__setitem__(n, y))
             for n, m in batchnorm_layers(model).items()]
    with torch.no_grad():
        model(images)
    for h in hooks:
        h.remove()
    for name, bn in batchnorm_layers(model).items():
        y = outputs[name].double().transpose(0, 1).flatten(1)
        # the mean of (x - mean) / sqrt(var + eps) * gamma + beta over the set is beta
        torch.testing.assert_close(y.mean(1), bn.bias.double(), rtol=0, atol=1e-4)


def test_stale_statistics_are_what_recalibration_fixes(one_thread):
    images = torch.randn(128, 1, 28, 28)
    model = _pruned_resnet(2).eval()
    before = batchnorm_layers(model)["layer3.2.bn2"].running_var.clone()
    recalibrate_batchnorm(model, images)
    assert not torch.allclose(batchnorm_layers(model)["layer3.2.bn2"].running_var, before)
    assert not model.training


def test_model_without_batchnorm_is_left_alone():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(3))
    model(torch.randn(2, 1, 8, 8))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert recalibrate_batchnorm(model, torch.randn(10, 1, 8, 8)) == []
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_no_images_is_an_error():
    with pytest.raises(ValueError, match="at least one batch"):
        recalibrate_batchnorm(_pruned_resnet(), [])


@pytest.mark.distributed
def test_two_ranks_recalibrate_to_identical_statistics(tmp_path):
    proc = torchrun(2, str(SCRIPTS / "recalibrate_ranks.py"), str(REPO / "configs" / "quickstart.yaml"),
                    "model.name=resnet20_cifar", f"run.out_dir={tmp_path}", "calibration.bn_images=200",
                    "calibration.batch_size=64", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("recalibration ok on rank") == 2
