"""Model registry: every model builds and runs; checkpoints load or fail with one clear line."""
import urllib.error

import pytest
import torch
from torch import nn

from rdprune.errors import UserError
from rdprune.models.registry import MODEL_NAMES, build_model, load_checkpoint

NATURAL_SHAPES = {
    "small_cnn": (1, 28, 28),
    "resnet20_cifar": (3, 32, 32), "resnet32_cifar": (3, 32, 32), "resnet44_cifar": (3, 32, 32),
    "resnet56_cifar": (3, 32, 32), "vgg16_cifar": (3, 32, 32),
}


def tiny_user_model(num_classes=3):
    return nn.Sequential(nn.Flatten(), nn.Linear(4, num_classes))


def no_argument_model():
    return nn.Linear(4, 2)


def not_a_module(num_classes=3):
    return "model"


def channel_aware_model(num_classes=3, in_channels=3):
    return nn.Sequential(nn.Conv2d(in_channels, 2, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, num_classes))


def kwargs_forwarding_model(**kwargs):
    return tiny_user_model(**kwargs)


def first_conv(model):
    return next(m for m in model.modules() if isinstance(m, nn.Conv2d))


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_registered_model_runs(name, one_thread):
    shape = NATURAL_SHAPES.get(name, (3, 64, 64))  # torchvision models at 64x64 to stay fast
    model = build_model(name, 7, input_shape=shape)
    assert model.training
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, *shape)).shape == (2, 7)


def test_registry_has_the_published_models():
    for name in ("small_cnn", "resnet20_cifar", "resnet56_cifar", "vgg16_cifar", "resnet50", "mobilenet_v2"):
        assert name in MODEL_NAMES


def test_vgg16_cifar_has_13_convs_and_a_linear_head():
    model = build_model("vgg16_cifar", 10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(convs) == 13 and len(linears) == 1 and linears[0].in_features == 512
    assert sum(m.weight.numel() for m in convs + linears) == 14_715_584


def test_small_cnn_sizes_itself_from_input_shape():
    model = build_model("small_cnn", 10, input_shape=(3, 32, 32))
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_user_model_by_import_path():
    assert build_model("test_models:tiny_user_model", 5, input_shape=(4,))[1].out_features == 5
    assert isinstance(build_model("test_models:no_argument_model", 2), nn.Linear)


@pytest.mark.parametrize("spec, message", [
    ("no_such_pkg.mod:fn", "model 'no_such_pkg.mod:fn': cannot import module 'no_such_pkg.mod' "
                           "(No module named 'no_such_pkg')"),
    ("test_models:missing", "model 'test_models:missing': module 'test_models' has no attribute 'missing'"),
    ("test_models:NATURAL_SHAPES", "model 'test_models:NATURAL_SHAPES': 'NATURAL_SHAPES' is a dict, not a callable"),
    ("test_models:not_a_module", "model 'test_models:not_a_module' returned a str, not a torch.nn.Module"),
])
def test_failing_import_path(spec, message):
    with pytest.raises(UserError) as err:
        build_model(spec, 3)
    assert str(err.value) == message


def test_unknown_model_name_lists_the_choices():
    with pytest.raises(UserError) as err:
        build_model("resnet9000", 10)
    assert str(err.value) == (
        "unknown model 'resnet9000': choose one of " + ", ".join(MODEL_NAMES)
        + ", timm:<name>, hf:<folder or repo id>, or give an import path 'package.module:callable'"
    )


def test_wrong_input_shape_is_reported_at_build_time():
    with pytest.raises(UserError, match=r"^model resnet20_cifar does not accept inputs of shape \[784\]: [^\n]+$"):
        build_model("resnet20_cifar", 10, input_shape=(784,))


@pytest.mark.parametrize("name", ["resnet20_cifar", "vgg16_cifar"])
def test_cifar_models_take_grayscale_digits(name, one_thread):
    model = build_model(name, 10, input_shape=(1, 28, 28))  # mnist5k's input shape
    assert first_conv(model).in_channels == 1
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_registered_model_takes_the_inputs_channel_count(name, one_thread):
    height = NATURAL_SHAPES.get(name, (3, 64, 64))[1]
    shape = (4, height, height)  # e.g. multispectral images
    model = build_model(name, 7, input_shape=shape)
    assert first_conv(model).in_channels == 4
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, *shape)).shape == (2, 7)
    # only the stem's weight changes shape: the state_dict keys (and so checkpoints) stay the same
    rgb = build_model(name, 7, input_shape=(3, height, height)).state_dict()
    changed = [k for k, v in model.state_dict().items() if rgb[k].shape != v.shape]
    assert list(model.state_dict()) == list(rgb) and len(changed) == 1 and changed[0].endswith("weight")


def test_pretrained_weights_refuse_other_channel_counts(monkeypatch):
    def must_not_download(url, *args, **kwargs):
        raise AssertionError("downloaded weights that cannot fit")

    monkeypatch.setattr("torchvision.models._api.load_state_dict_from_url", must_not_download)
    with pytest.raises(UserError, match=(
        r"^torchvision weights 'DEFAULT' for resnet18 take 3-channel \(RGB\) inputs, but the data has 1 channel "
        r"\(input shape \[1, 28, 28\]\); drop model.weights to train resnet18 from scratch with a 1-channel stem$"
    )):
        build_model("resnet18", 1000, weights="DEFAULT", input_shape=(1, 28, 28))


def test_user_model_gets_in_channels_only_when_it_names_it():
    model = build_model("test_models:channel_aware_model", 5, input_shape=(6, 8, 8))
    assert model[0].in_channels == 6 and model[3].out_features == 5
    # a builder that forwards **kwargs gets num_classes but no in_channels it did not ask for
    assert build_model("test_models:kwargs_forwarding_model", 5, input_shape=(1, 2, 2))[1].out_features == 5


def test_checkpoint_round_trip_and_ddp_prefix(tmp_path, one_thread):
    source = build_model("resnet20_cifar", 10)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(torch.randn_like(p))
    x = torch.randn(3, 3, 32, 32)
    expected = source.eval()(x)
    plain, ddp = tmp_path / "plain.pth", tmp_path / "ddp.pth"
    torch.save(source.state_dict(), plain)
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, ddp)
    for path in (plain, ddp):
        loaded = build_model("resnet20_cifar", 10, checkpoint=str(path)).eval()
        assert torch.equal(loaded(x), expected)


def test_missing_checkpoint(tmp_path):
    path = tmp_path / "nope.pth"
    with pytest.raises(UserError) as err:
        build_model("small_cnn", 10, checkpoint=str(path))
    assert str(err.value) == f"checkpoint {path} does not exist"


def test_corrupt_checkpoint(tmp_path):
    path = tmp_path / "random.pth"
    path.write_bytes(bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0)).tolist()))
    with pytest.raises(UserError) as err:
        build_model("small_cnn", 10, checkpoint=str(path))
    message = str(err.value)
    assert message.startswith(f"checkpoint {path} is not a readable PyTorch state_dict: ")
    assert "\n" not in message and len(message) > len(f"checkpoint {path} is not a readable PyTorch state_dict: ")


def test_checkpoint_that_is_not_a_state_dict(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([1, 2], path)
    with pytest.raises(UserError) as err:
        build_model("small_cnn", 10, checkpoint=str(path))
    assert str(err.value) == f"checkpoint {path} is not a readable PyTorch state_dict: it holds a list, not a dict of tensors"


def test_checkpoint_with_mismatched_keys(tmp_path):
    state = build_model("small_cnn", 10).state_dict()
    state.pop("features.0.weight")
    state.pop("features.0.bias")
    state.pop("classifier.3.bias")
    state["extra.weight"] = torch.zeros(2)
    path = tmp_path / "keys.pth"
    torch.save(state, path)
    with pytest.raises(UserError) as err:
        build_model("small_cnn", 10, checkpoint=str(path))
    assert str(err.value) == (
        f"checkpoint {path} does not fit model small_cnn: 3 missing keys "
        "(features.0.weight, features.0.bias, classifier.3.bias), 1 unexpected key (extra.weight)"
    )


def test_checkpoint_with_wrong_shapes(tmp_path):
    path = tmp_path / "shape.pth"
    torch.save(build_model("small_cnn", 10).state_dict(), path)
    model = build_model("small_cnn", 100)
    with pytest.raises(UserError) as err:
        load_checkpoint(model, path, model_name="small_cnn")
    assert str(err.value) == (
        f"checkpoint {path} does not fit model small_cnn: key classifier.3.weight has shape [10, 128] "
        "in the checkpoint, [100, 128] in the model"
    )


def test_weights_download_failure_says_how_to_use_a_checkpoint(monkeypatch, tmp_path):
    def offline(url, *args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr("torchvision.models._api.load_state_dict_from_url", offline)
    with pytest.raises(UserError) as err:
        build_model("resnet18", 1000, weights="DEFAULT")
    assert str(err.value) == (
        "cannot download torchvision weights 'DEFAULT' for resnet18 (<urlopen error Name or service not known>); "
        "download them elsewhere (https://download.pytorch.org/models/resnet18-f37072fd.pth) "
        "and set model.checkpoint to the .pth file"
    )


def test_weights_are_skipped_when_a_checkpoint_is_given(monkeypatch, tmp_path):
    def must_not_download(url, *args, **kwargs):
        raise AssertionError("downloaded although a checkpoint was given")

    monkeypatch.setattr("torchvision.models._api.load_state_dict_from_url", must_not_download)
    path = tmp_path / "r18.pth"
    torch.save(build_model("resnet18", 1000).state_dict(), path)
    assert isinstance(build_model("resnet18", 1000, weights="DEFAULT", checkpoint=str(path)), nn.Module)


@pytest.mark.parametrize("name, classes, weights, message", [
    ("small_cnn", 10, "DEFAULT", "model.weights is only for torchvision models"),
    ("resnet18", 10, "DEFAULT", "torchvision weights 'DEFAULT' for resnet18 have 1000 classes, but num_classes is 10"),
    ("resnet50", 1000, "BEST", "unknown torchvision weights 'BEST' for resnet50: choose one of DEFAULT, IMAGENET1K_V1"),
])
def test_bad_weights(name, classes, weights, message):
    with pytest.raises(UserError) as err:
        build_model(name, classes, weights=weights)
    assert str(err.value).startswith(message)
