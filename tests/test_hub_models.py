"""timm: and hf: models by name: build, weights from local files only, preprocessing, one-line errors.

Nothing here downloads: models are randomly initialised, and "cached" weights are files the tests
write into a temporary Hugging Face or torch.hub cache.
"""
import dataclasses
import json
import logging
import os
import re
import subprocess
import sys

import pytest
import torch
from torch import nn

from rdprune.data.preprocessing import IMAGENET_MEAN, IMAGENET_STD, RESNET, Preprocessing
from rdprune.errors import UserError
from rdprune.models.hf_models import HFImageClassifier
from rdprune.models.registry import build_model, model_preprocessing

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

TINY_VIT = "timm:vit_tiny_patch16_224"
TINY_VIT_KWARGS = {"img_size": 28, "patch_size": 7, "embed_dim": 48, "depth": 2, "num_heads": 3}
DIGITS = (1, 28, 28)


def drop_path_model(num_classes=3, drop_path_rate=0.0):
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, num_classes))
    model.drop_path_rate = drop_path_rate
    return model


def drop_probs(model):
    return [m.drop_prob for m in model.modules() if isinstance(m, timm.layers.DropPath)]


def message(excinfo):
    text = str(excinfo.value)
    assert isinstance(excinfo.value, UserError) and "\n" not in text
    return text


@pytest.fixture
def empty_caches(monkeypatch, tmp_path):
    """Point every model cache at empty folders."""
    for var, sub in (("HF_HOME", "hf_home"), ("HF_HUB_CACHE", "hf_home/hub"), ("TORCH_HOME", "torch_home")):
        (tmp_path / sub).mkdir(parents=True, exist_ok=True)
        monkeypatch.setenv(var, str(tmp_path / sub))
    return tmp_path


def hub_snapshot(cache, repo_id):
    """A snapshot folder of ``repo_id`` in Hugging Face cache ``cache``, laid out as huggingface_hub does."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    return snapshot


# ---------------------------------------------------------------- timm


def test_tiny_vit_on_digits(one_thread):
    model = build_model(TINY_VIT, 10, input_shape=DIGITS, kwargs=TINY_VIT_KWARGS)
    assert model.training
    assert model(torch.randn(4, *DIGITS)).shape == (4, 10)
    assert model.patch_embed.proj.in_channels == 1 and model.embed_dim == 48 and len(model.blocks) == 2


def test_convnext_atto_takes_one_channel(one_thread):
    model = build_model("timm:convnext_atto", 5, input_shape=(1, 32, 32))
    assert model.stem[0].in_channels == 1
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 5)


def test_drop_path_rate_reaches_timm_model():
    assert not any(p > 0 for p in drop_probs(build_model(TINY_VIT, 10, input_shape=DIGITS, kwargs=TINY_VIT_KWARGS)))
    model = build_model(TINY_VIT, 10, input_shape=DIGITS, kwargs=TINY_VIT_KWARGS, drop_path_rate=0.2)
    probs = drop_probs(model)
    assert probs and max(probs) == pytest.approx(0.2)


def test_timm_checkpoint_round_trip(tmp_path):
    model = build_model(TINY_VIT, 10, input_shape=DIGITS, kwargs=TINY_VIT_KWARGS)
    path = tmp_path / "vit.pt"
    torch.save(model.state_dict(), path)
    loaded = build_model(TINY_VIT, 10, input_shape=DIGITS, kwargs=TINY_VIT_KWARGS, checkpoint=str(path))
    for key, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor), key


@pytest.mark.parametrize("where", ["hf_hub", "torch_hub"])
def test_cached_timm_weights_load_without_network(where, empty_caches, caplog):
    pretrained = timm.create_model("convnext_atto")  # stands in for the published weights (1000 classes)
    state = {k: v.contiguous() for k, v in pretrained.state_dict().items()}
    if where == "hf_hub":
        safetensors_torch.save_file(state, hub_snapshot(empty_caches / "hf_home" / "hub", "timm/convnext_atto.d2_in1k")
                                    / "model.safetensors")
    else:
        folder = empty_caches / "torch_home" / "hub" / "checkpoints"
        folder.mkdir(parents=True)
        torch.save(state, folder / "convnext_atto_d2-01bb0f51.pth")
    offline_before = os.environ.get("HF_HUB_OFFLINE")
    with caplog.at_level(logging.INFO, logger="rdprune.models.timm_models"):
        model = build_model("timm:convnext_atto", 10, weights="DEFAULT", input_shape=(3, 32, 32))
    assert torch.equal(model.stem[0].weight, state["stem.0.weight"])
    assert model.head.fc.out_features == 10
    assert "re-initialises the classifier of convnext_atto.d2_in1k" in caplog.text
    assert os.environ.get("HF_HUB_OFFLINE") == offline_before
    tagged = build_model("timm:convnext_atto", 10, weights="d2_in1k", input_shape=(3, 32, 32))
    assert torch.equal(tagged.stem[0].weight, state["stem.0.weight"])


def test_timm_weights_not_cached(empty_caches):
    with pytest.raises(UserError) as excinfo:
        build_model("timm:convnext_atto", 10, weights="DEFAULT")
    text = message(excinfo)
    assert text.startswith("timm weights convnext_atto.d2_in1k are not in the local cache (")
    assert str(empty_caches / "hf_home" / "hub") in text
    assert "run timm.create_model('convnext_atto.d2_in1k', pretrained=True) on a machine with network" in text
    assert text.endswith("copy its cache (HF_HOME) here, or set model.checkpoint to a local state_dict")


def test_timm_weights_are_skipped_when_a_checkpoint_is_given(empty_caches, tmp_path):
    model = build_model("timm:convnext_atto", 10, input_shape=(3, 32, 32))
    torch.save(model.state_dict(), tmp_path / "atto.pt")
    loaded = build_model("timm:convnext_atto", 10, weights="DEFAULT", checkpoint=str(tmp_path / "atto.pt"))
    assert torch.equal(loaded.stem[0].weight, model.stem[0].weight)


def test_timm_preprocessing_is_the_pretrained_cfg():
    deit = model_preprocessing("timm:deit_small_patch16_224")
    assert deit.interpolation == "bicubic" and deit.size == 224 and deit.crop_mode == "center"
    assert deit.mean == IMAGENET_MEAN and deit.std == IMAGENET_STD
    # DeiT's published crop is 0.875; timm 1.0.x records 0.9 for its fb_in1k weights
    assert deit.crop_pct == pytest.approx(timm.models.get_pretrained_cfg("deit_small_patch16_224").crop_pct)
    assert deit.crop_pct in (pytest.approx(0.875), pytest.approx(0.9))
    vit = model_preprocessing(TINY_VIT, TINY_VIT_KWARGS)
    assert vit == Preprocessing(size=28, interpolation="bicubic", crop_pct=vit.crop_pct, mean=(0.5,) * 3, std=(0.5,) * 3)
    assert model_preprocessing("timm:convnext_atto", {"img_size": (40, 40)}).size == 40


def test_other_models_keep_the_dataset_preprocessing():
    assert model_preprocessing("resnet18") is None
    assert model_preprocessing("resnet20_cifar", {}) is None
    assert model_preprocessing("torchvision.models:resnet18") is None


# ---------------------------------------------------------------- Hugging Face


@pytest.fixture
def hf_folder(tmp_path):
    """A tiny ViT digit classifier and its processor, saved as save_pretrained() writes them."""
    config = transformers.ViTConfig(image_size=28, patch_size=7, num_channels=1, hidden_size=48, num_hidden_layers=2,
                                    num_attention_heads=3, intermediate_size=96, num_labels=10)
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(config).eval()
    folder = tmp_path / "tiny-vit"
    model.save_pretrained(folder)
    transformers.ViTImageProcessor(size={"height": 28, "width": 28}, resample=3, image_mean=[0.5], image_std=[0.25]
                                   ).save_pretrained(folder)
    return folder, model


def test_hf_folder_reproduces_the_saved_model(hf_folder, one_thread):
    folder, saved = hf_folder
    model = build_model(f"hf:{folder}", 10, weights="DEFAULT", input_shape=DIGITS)
    assert isinstance(model, HFImageClassifier) and model.training
    x = torch.randn(3, *DIGITS)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), saved(pixel_values=x).logits)


def test_hf_without_weights_builds_from_the_config(hf_folder):
    folder, saved = hf_folder
    model = build_model(f"hf:{folder}", 7, input_shape=DIGITS)
    assert model.config.num_labels == 7 and model.config.hidden_size == 48
    assert model(torch.randn(2, *DIGITS)).shape == (2, 7)
    assert not torch.equal(model.model.vit.embeddings.patch_embeddings.projection.weight,
                           saved.vit.embeddings.patch_embeddings.projection.weight)


def test_hf_weights_with_another_class_count_reset_the_classifier(hf_folder):
    folder, saved = hf_folder
    model = build_model(f"hf:{folder}", 5, weights="DEFAULT", input_shape=DIGITS)
    assert model.model.classifier.out_features == 5
    assert torch.equal(model.model.vit.embeddings.patch_embeddings.projection.weight,
                       saved.vit.embeddings.patch_embeddings.projection.weight)


def test_hf_kwargs_override_the_config(hf_folder):
    folder, _ = hf_folder
    model = build_model(f"hf:{folder}", 10, input_shape=DIGITS, kwargs={"hidden_dropout_prob": 0.25, "num_labels": 10})
    assert model.config.hidden_dropout_prob == 0.25


def test_hf_checkpoint_round_trip(hf_folder, tmp_path):
    folder, _ = hf_folder
    model = build_model(f"hf:{folder}", 10, input_shape=DIGITS)
    torch.save(model.state_dict(), tmp_path / "hf.pt")
    loaded = build_model(f"hf:{folder}", 10, input_shape=DIGITS, checkpoint=str(tmp_path / "hf.pt"))
    for key, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor), key


def test_hf_repo_id_from_the_local_cache(hf_folder, empty_caches):
    folder, saved = hf_folder
    snapshot = hub_snapshot(empty_caches / "hf_home" / "hub", "someone/tiny-vit")
    for file in folder.iterdir():
        (snapshot / file.name).write_bytes(file.read_bytes())
    model = build_model("hf:someone/tiny-vit", 10, weights="DEFAULT", input_shape=DIGITS).eval()
    x = torch.randn(2, *DIGITS)
    with torch.no_grad():
        assert torch.equal(model(x), saved(pixel_values=x).logits)
    assert model_preprocessing("hf:someone/tiny-vit").size == 28


def test_hf_preprocessing_reads_the_processor_config(hf_folder, tmp_path):
    folder, saved = hf_folder
    assert model_preprocessing(f"hf:{folder}") == Preprocessing(
        size=28, interpolation="bicubic", crop_pct=1.0, crop_mode="squash", mean=(0.5,) * 3, std=(0.25,) * 3)
    bare = tmp_path / "no-processor"
    saved.save_pretrained(bare)
    assert model_preprocessing(f"hf:{bare}") is None


@pytest.mark.parametrize("processor, expected", [
    ({"size": {"shortest_edge": 224}, "crop_pct": 0.875, "resample": 3},  # ConvNeXt
     Preprocessing(size=224, interpolation="bicubic", crop_pct=0.875, crop_mode="center")),
    ({"size": {"shortest_edge": 256}, "do_center_crop": True, "crop_size": {"height": 224, "width": 224}, "resample": 2},  # CLIP, BiT
     Preprocessing(size=224, interpolation="bilinear", crop_pct=0.875, crop_mode="center")),
    ({"size": {"height": 256, "width": 256}, "do_center_crop": True, "crop_size": {"height": 224, "width": 224},
      "resample": 0, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]},  # DeiT
     Preprocessing(size=224, interpolation="nearest", crop_pct=0.875, crop_mode="squash", mean=(0.5,) * 3, std=(0.5,) * 3)),
])
def test_hf_processor_kinds(processor, expected, tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(processor))
    assert model_preprocessing(f"hf:{tmp_path}") == expected


@pytest.mark.parametrize("shortest_edge, expected", [
    (224, Preprocessing(size=224, interpolation="bicubic", crop_pct=0.875, crop_mode="center", mean=(0.5,) * 3, std=(0.5,) * 3)),
    # from 384 on ConvNextImageProcessor warps the whole image to 384 x 384: no crop, whatever crop_pct says
    (384, Preprocessing(size=384, interpolation="bicubic", crop_pct=1.0, crop_mode="squash", mean=(0.5,) * 3, std=(0.5,) * 3)),
])
def test_hf_convnext_processor_crops_below_384_and_warps_from_384(shortest_edge, expected, tmp_path):
    processor = transformers.ConvNextImageProcessor(size={"shortest_edge": shortest_edge})
    processor.save_pretrained(tmp_path)
    assert processor.crop_pct == pytest.approx(0.875)
    assert model_preprocessing(f"hf:{tmp_path}") == expected
    image = torch.randint(0, 256, (3, 500, 700), dtype=torch.uint8)
    assert tuple(processor(image, return_tensors="pt")["pixel_values"].shape[-2:]) == (expected.size, expected.size)


def grey_image():
    """A smooth 550 x 400 RGB photo-like image: random colours upsampled bicubically."""
    from PIL import Image
    small = torch.Generator().manual_seed(0)
    pixels = (torch.rand(40, 55, 3, generator=small) * 255).to(torch.uint8).numpy()
    return Image.fromarray(pixels).resize((550, 400), Image.BICUBIC)


@pytest.mark.parametrize("processor", [
    transformers.ViTImageProcessor(),
    transformers.DeiTImageProcessor(),
    transformers.ConvNextImageProcessor(),
    transformers.ConvNextImageProcessor(size={"shortest_edge": 160}),
    transformers.PoolFormerImageProcessor(),  # crop_pct with crop_size: the shorter edge to int(224 / 0.9), then 224
    transformers.ViTImageProcessor(do_rescale=False, do_normalize=False),  # a model that takes 0..255
    transformers.ViTImageProcessor(do_rescale=False, image_mean=[127.5] * 3, image_std=[60.0] * 3),
    transformers.EfficientNetImageProcessor(),  # include_top divides by image_std twice
    transformers.EfficientNetImageProcessor(rescale_factor=1 / 127.5, rescale_offset=True, include_top=False),
    transformers.LevitImageProcessor(),  # the shorter edge to int(256 / 224 * 224), then the 224 crop
], ids=["vit", "deit", "convnext-384", "convnext-160", "poolformer", "0-255", "0-255-normalised", "efficientnet",
        "efficientnet-offset", "levit"])
def test_hf_processor_is_reproduced_by_the_eval_transform(processor, tmp_path, caplog):
    from rdprune.data.imagenet import eval_transform
    processor.save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING, logger="rdprune.models.hf_models"):
        preprocessing = model_preprocessing(f"hf:{tmp_path}")
    assert hf_warnings(caplog) == []  # the built-in check agrees
    image = grey_image()
    ours = eval_transform(preprocessing)(image)
    theirs = processor(image, return_tensors="pt")["pixel_values"][0]
    assert ours.shape == theirs.shape
    grey_levels = (ours - theirs).abs() * torch.tensor(preprocessing.std).view(3, 1, 1) * 255  # back to 0..255 pixels
    assert grey_levels.mean() < 0.05 and grey_levels.max() <= 2.01, (grey_levels.mean(), grey_levels.max())


@pytest.mark.parametrize("processor, found", [
    (transformers.ViTImageProcessor(size={"shortest_edge": 224, "longest_edge": 256}, crop_size={"height": 224, "width": 224},
                                    do_center_crop=True), "a mean difference of"),  # resized to fit 256, then padded
    (transformers.MobileViTImageProcessor(), "a mean difference of"),  # BGR, and a 256 crop of a 224 image
    (transformers.PoolFormerImageProcessor(do_center_crop=False), "its processor gives [3, 248, 330], rdprune's pipeline [3, 224, 224]"),
], ids=["longest-edge", "mobilevit", "no-crop"])
def test_hf_processor_rdprune_cannot_reproduce_is_named(processor, found, tmp_path, caplog):
    processor.save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING, logger="rdprune.models.hf_models"):
        assert model_preprocessing(f"hf:{tmp_path}") is not None  # the run goes on, with the nearest recipe
    [warning] = hf_warnings(caplog)
    assert warning.startswith(f"model 'hf:{tmp_path}': rdprune's image pipeline does not reproduce its {type(processor).__name__} "
                              f"on a test image (") and found in warning and "will not match the model card" in warning


def test_hf_image_size_override_sets_the_preprocessing_size(hf_folder, tmp_path):
    folder, _ = hf_folder
    squash = model_preprocessing(f"hf:{folder}")
    assert model_preprocessing(f"hf:{folder}", {"image_size": 35}) == dataclasses.replace(squash, size=35)
    assert model_preprocessing(f"hf:{folder}", {"image_size": [42, 42], "hidden_size": 48}).size == 42
    model = build_model(f"hf:{folder}", 10, weights="DEFAULT", input_shape=(1, 35, 35), kwargs={"image_size": 35})
    assert model.config.image_size == 35
    crop = tmp_path / "deit"
    crop.mkdir()
    (crop / "preprocessor_config.json").write_text(json.dumps(
        {"size": {"height": 256, "width": 256}, "do_center_crop": True, "crop_size": {"height": 224, "width": 224}}))
    larger = model_preprocessing(f"hf:{crop}", {"image_size": 384})
    assert larger.size == 384 and larger.crop_pct == pytest.approx(0.875) and larger.resize_size == 438
    bare = tmp_path / "no_processor"  # no recipe of its own: the default one, at the size asked for
    bare.mkdir()
    assert model_preprocessing(f"hf:{bare}") is None
    assert model_preprocessing(f"hf:{bare}", {"image_size": 384}) == dataclasses.replace(RESNET, size=384)
    with pytest.raises(UserError):
        model_preprocessing(f"hf:{folder}", {"image_size": [[224]]})
    with pytest.raises(UserError) as excinfo:
        model_preprocessing(f"hf:{folder}", {"image_size": [28, 35]})
    assert message(excinfo) == (f"model 'hf:{folder}': model.kwargs image_size must be a positive int (or a square "
                                f"[height, width]) for rdprune's square image data, not [28, 35]")


def hf_warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "rdprune.models.hf_models" and r.levelno == logging.WARNING]


def test_hf_weights_that_do_not_fit_the_config_are_named(hf_folder, tmp_path, caplog):
    folder, _ = hf_folder
    rgb = transformers.ViTForImageClassification(transformers.ViTConfig.from_pretrained(folder, num_channels=3))
    rgb.save_pretrained(tmp_path / "rgb-vit")
    with caplog.at_level(logging.INFO, logger="rdprune.models.hf_models"):
        model = build_model(f"hf:{tmp_path / 'rgb-vit'}", 5, weights="DEFAULT", input_shape=DIGITS)
    assert model.model.vit.embeddings.patch_embeddings.projection.in_channels == 1
    [warning] = hf_warnings(caplog)
    assert warning == (f"model 'hf:{tmp_path / 'rgb-vit'}': 1 weight is initialised at random, not loaded from the saved "
                       f"weights (model.kwargs or the data's channel count change their shapes, or the saved weights lack them): "
                       f"vit.embeddings.patch_embeddings.projection.weight (saved [48, 3, 7, 7], model [48, 1, 7, 7])")
    assert "classifier" not in warning
    assert "the classifier of hf:" in caplog.text and "its weights have 10 labels, num_classes is 5" in caplog.text

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="rdprune.models.hf_models"):
        build_model(f"hf:{folder}", 10, weights="DEFAULT", input_shape=(1, 35, 35), kwargs={"image_size": 35})
    [warning] = hf_warnings(caplog)
    assert "vit.embeddings.position_embeddings (saved [1, 17, 48], model [1, 26, 48])" in warning
    assert "classifier" not in caplog.text

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="rdprune.models.hf_models"):
        build_model(f"hf:{folder}", 10, weights="DEFAULT", input_shape=DIGITS)
    assert hf_warnings(caplog) == []


def test_hf_hidden_layer_as_wide_as_the_classifier_is_still_named(tmp_path, caplog):
    """The classifier is what lies outside the backbone, not any Linear with one output per label."""
    config = transformers.ViTConfig(image_size=28, patch_size=7, num_channels=1, hidden_size=48, num_hidden_layers=1,
                                    num_attention_heads=3, intermediate_size=64, num_labels=96)
    transformers.ViTForImageClassification(config).save_pretrained(tmp_path / "vit")
    with caplog.at_level(logging.INFO, logger="rdprune.models.hf_models"):
        build_model(f"hf:{tmp_path / 'vit'}", 96, weights="DEFAULT", input_shape=DIGITS, kwargs={"intermediate_size": 96})
    [warning] = hf_warnings(caplog)
    assert re.search(r"vit\.\S+\.weight \(saved \[64, 48\], model \[96, 48\]\)", warning)  # the MLP's first layer
    assert "classifier" not in warning


def test_hf_checkpoint_of_the_bare_transformers_model(hf_folder, tmp_path, one_thread):
    folder, saved = hf_folder
    torch.save(saved.state_dict(), tmp_path / "bare.pt")
    assert not any(key.startswith("model.") for key in saved.state_dict())
    x = torch.randn(3, *DIGITS)
    for weights in (None, "DEFAULT"):
        model = build_model(f"hf:{folder}", 10, weights=weights, input_shape=DIGITS, checkpoint=str(tmp_path / "bare.pt"))
        with torch.no_grad():
            assert torch.equal(model.eval()(x), saved(pixel_values=x).logits)
    wrapper = build_model(f"hf:{folder}", 10, input_shape=DIGITS)
    wrapper.load_state_dict(saved.state_dict())
    with torch.no_grad():
        assert torch.equal(wrapper.eval()(x), saved(pixel_values=x).logits)
    partial = {k: v for k, v in saved.state_dict().items() if k != "classifier.bias"}
    torch.save(partial, tmp_path / "partial.pt")
    with pytest.raises(UserError) as excinfo:
        build_model(f"hf:{folder}", 10, input_shape=DIGITS, checkpoint=str(tmp_path / "partial.pt"))
    assert message(excinfo).endswith(f"does not fit model hf:{folder}: 1 missing key (model.classifier.bias)")


# ---------------------------------------------------------------- other families


def test_import_paths_still_work_and_take_kwargs():
    model = build_model("torchvision.models:resnet18", 10, input_shape=(3, 32, 32), kwargs={"zero_init_residual": True})
    assert model.fc.out_features == 10 and torch.count_nonzero(model.layer1[0].bn2.weight) == 0
    assert build_model("test_hub_models:drop_path_model", 3, drop_path_rate=0.3).drop_path_rate == 0.3


def test_torchvision_registry_models_take_kwargs():
    model = build_model("resnet18", 10, input_shape=(3, 32, 32), kwargs={"zero_init_residual": True})
    assert torch.count_nonzero(model.layer1[0].bn2.weight) == 0


def test_timm_prefix_is_never_an_import_path():
    # as an import path this would have called timm.create_model() with num_classes only
    with pytest.raises(UserError) as excinfo:
        build_model("timm:create_model", 10)
    assert message(excinfo).startswith("unknown timm model 'create_model' in model 'timm:create_model': ")


# ---------------------------------------------------------------- bad input


def test_unknown_timm_model_suggests_near_names():
    with pytest.raises(UserError) as excinfo:
        build_model("timm:vit_tiny_patch16_2244", 10)
    assert message(excinfo) == ("unknown timm model 'vit_tiny_patch16_2244' in model 'timm:vit_tiny_patch16_2244': "
                                "did you mean vit_tiny_patch16_224, deit_tiny_patch16_224, vit_tiny_patch16_384?")


def test_missing_timm(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(UserError) as excinfo:
        build_model("timm:resnet10t", 10)
    assert message(excinfo) == "model 'timm:resnet10t' needs timm: pip install 'rdprune[timm]'"
    with pytest.raises(UserError, match=re.escape("needs timm: pip install 'rdprune[timm]'")):
        model_preprocessing("timm:resnet10t")


def test_missing_transformers(monkeypatch, hf_folder):
    folder, _ = hf_folder
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(UserError) as excinfo:
        build_model(f"hf:{folder}", 10)
    assert message(excinfo) == f"model 'hf:{folder}' needs transformers: pip install 'rdprune[hf]'"


@pytest.mark.parametrize("name, kwargs, expected", [
    ("timm:convnext_atto", {"depth": 2},
     "model 'timm:convnext_atto' does not take keyword argument 'depth' (from model.kwargs); remove it"),
    ("timm:convnext_atto", {"num_classes": 5},
     "model 'timm:convnext_atto': model.kwargs sets num_classes=5, but rdprune sets num_classes=10 from the data "
     "(num_classes and the input's channel count); drop num_classes from model.kwargs"),
    ("timm:convnext_atto", {"pretrained": True}, "model 'timm:convnext_atto': set model.weights, not pretrained in model.kwargs"),
    ("resnet20_cifar", {"width": 2},
     "model.kwargs is for timm:, hf:, torchvision and import-path models, not 'resnet20_cifar': remove model.kwargs (width)"),
    ("resnet18", {"depth": 3}, "model 'resnet18' does not take keyword argument 'depth' (from model.kwargs); remove it"),
])
def test_bad_kwargs(name, kwargs, expected):
    with pytest.raises(UserError) as excinfo:
        build_model(name, 10, kwargs=kwargs)
    assert message(excinfo) == expected


def test_timm_kwargs_may_repeat_the_automatic_ones():
    model = build_model("timm:convnext_atto", 10, input_shape=(1, 32, 32), kwargs={"num_classes": 10, "in_chans": 1})
    assert model.stem[0].in_channels == 1


def test_hf_unknown_config_key_lists_near_names(hf_folder):
    folder, _ = hf_folder
    with pytest.raises(UserError) as excinfo:
        build_model(f"hf:{folder}", 10, kwargs={"hiden_size": 64})
    assert message(excinfo).startswith(f"model 'hf:{folder}': model.kwargs key 'hiden_size' is not an attribute of its "
                                       f"ViTConfig; did you mean hidden_size")


@pytest.mark.parametrize("name, expected", [
    ("resnet20_cifar", "model.drop_path_rate is for timm:, hf: and import-path models that take it, not 'resnet20_cifar': "
                       "remove model.drop_path_rate"),
    ("resnet18", "model.drop_path_rate is for timm:, hf: and import-path models that take it, not 'resnet18': "
                 "remove model.drop_path_rate"),
    ("torchvision.models:resnet18", "model 'torchvision.models:resnet18' does not take keyword argument 'drop_path_rate' "
                                    "(from model.drop_path_rate); remove it"),
])
def test_drop_path_rate_where_there_is_none(name, expected):
    with pytest.raises(UserError) as excinfo:
        build_model(name, 10, drop_path_rate=0.1)
    assert message(excinfo) == expected


def test_hf_drop_path_rate_needs_it_in_the_config(hf_folder):
    folder, _ = hf_folder
    with pytest.raises(UserError) as excinfo:
        build_model(f"hf:{folder}", 10, drop_path_rate=0.1)
    assert message(excinfo) == f"model 'hf:{folder}': its ViTConfig has no drop_path_rate; remove model.drop_path_rate"


def test_hf_folder_that_does_not_exist(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(UserError) as excinfo:
        build_model(f"hf:{missing}", 10)
    assert message(excinfo).startswith(f"model 'hf:{missing}': '{missing}' is neither a local folder nor in the local "
                                       f"Hugging Face cache (")


def test_hf_repo_not_in_the_cache(empty_caches):
    with pytest.raises(UserError) as excinfo:
        build_model("hf:google/vit-base-patch16-224", 1000, weights="DEFAULT")
    assert message(excinfo) == (
        f"model 'hf:google/vit-base-patch16-224': 'google/vit-base-patch16-224' is neither a local folder nor in the local "
        f"Hugging Face cache ({empty_caches / 'hf_home' / 'hub'}); give a folder written by save_pretrained(), or run "
        f"from_pretrained('google/vit-base-patch16-224') on a machine with network and copy its cache (HF_HOME) here")


def test_hf_folder_without_weights(hf_folder, tmp_path):
    folder, _ = hf_folder
    bare = tmp_path / "config-only"
    bare.mkdir()
    (bare / "config.json").write_bytes((folder / "config.json").read_bytes())
    with pytest.raises(UserError) as excinfo:
        build_model(f"hf:{bare}", 10, weights="DEFAULT")
    assert message(excinfo).startswith(f"model 'hf:{bare}': cannot load its saved weights (")
    assert isinstance(build_model(f"hf:{bare}", 10, input_shape=DIGITS), HFImageClassifier)


@pytest.mark.parametrize("name, weights, expected", [
    ("timm:convnext_atto", "in22k", "unknown pretrained tag 'in22k' for timm model 'convnext_atto' (model 'timm:convnext_atto'): "
                                    "choose one of DEFAULT, d2_in1k"),
    ("timm:convnext_atto.d2_in1k", "other", "model 'timm:convnext_atto.d2_in1k' names pretrained tag 'd2_in1k' but "
                                            "model.weights is 'other': set only one"),
    ("small_cnn", "DEFAULT", "model.weights is only for torchvision models"),
])
def test_bad_weights(name, weights, expected):
    with pytest.raises(UserError) as excinfo:
        build_model(name, 10, weights=weights)
    assert message(excinfo).startswith(expected)


def test_hf_weights_are_default_or_null(hf_folder):
    folder, _ = hf_folder
    with pytest.raises(UserError) as excinfo:
        build_model(f"hf:{folder}", 10, weights="IMAGENET1K_V1")
    assert message(excinfo) == (f"model 'hf:{folder}': model.weights is DEFAULT (the saved weights) or null "
                                f"(random init) for hf: models, not 'IMAGENET1K_V1'")


def test_importing_rdprune_loads_neither_extra():
    """timm and transformers are optional extras: importing the package, its config or its run loop must not load
    them (nor torchvision for the pruning core); only naming a timm: or hf: model does."""
    code = ("import sys, rdprune; core = 'torchvision' in sys.modules; import rdprune.config, rdprune.pipeline.loop; "
            "print(core, 'timm' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True).stdout
    assert out.split() == ["False", "False", "False"]
