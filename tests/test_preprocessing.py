"""A model's ``Preprocessing`` drives both input pipelines: torchvision and DALI give the same tensors.

The equality tests decode a generated folder of real JPEG files (several sizes and aspect ratios,
upscaled and downscaled, one grayscale) with the torchvision evaluation transform and with the
DALI evaluation pipeline in CPU mode, and compare them image by image, in the same order, with
the same labels.

Tolerance, in normalised units (one grey level is 1 / (255 std): 0.0175 with the ImageNet std,
0.0078 with std 0.5). Both backends decode with libjpeg-turbo and resample with the same filters
(antialiased triangle / Keys cubic, the same output size and crop offset), so what remains is
arithmetic: PIL rounds to 8 bits between its horizontal and vertical passes and clips bicubic
overshoot there. Measured with DALI 2.4 (CPU), torchvision 0.29 and Pillow 13 over the images below, for the
bilinear and bicubic recipes tested (RESNET, ViT-like, squash):

- mean |difference| at most 0.0009 (per image at most 0.0014);
- 99.9th percentile at most 0.0175 (one grey level);
- maximum 0.12 (bicubic: overshoot clipped by PIL in the noise patches).

Bounds: mean < 0.003 and 99.9th percentile < 0.08 over all images (margins x3 and x4.5). A wrong
setting exceeds them, measured for the ViT recipe: bilinear instead of bicubic (99.9th percentile
0.16), no antialiasing (0.31), crop_pct 0.875 instead of 0.9 (mean 0.034), squash instead of
centre (mean 0.057), ImageNet instead of 0.5 mean/std (mean 0.31), a one-pixel shift (mean 0.024),
a mirrored, upside-down or transposed image (mean 0.17-0.18), BGR instead of RGB (mean 0.15).

Nearest neighbour differs at exact ties: when a source coordinate falls exactly on a pixel
boundary (every third row for a 4/3 scale, 256 -> 192), PIL (accumulated floating-point steps) and
DALI pick neighbouring rows in a pattern neither controls, so whole rows can differ. Measured for
size 192, crop_pct 1.0: 0.42 % of the values differ by more than 2.5 grey levels (3.2 % in the
257x256 image); the bound is 2 %, and a wrong setting gives at least 6.8 % (bilinear instead of
nearest 7 %, a one-pixel shift 9 %, another crop_pct 15 %).
"""
import logging
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from rdprune.data import build_data
from rdprune.data.imagenet import eval_transform, train_transform
from rdprune.data.preprocessing import IMAGENET_MEAN, IMAGENET_STD, RESNET, Preprocessing, crop_fraction
from rdprune.distributed import DistInfo
from rdprune.pipeline import feeding

VIT = Preprocessing(size=224, interpolation="bicubic", crop_pct=0.9, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
SQUASH = Preprocessing(size=224, interpolation="bicubic", crop_pct=0.95, crop_mode="squash")
NEAREST = Preprocessing(size=192, interpolation="nearest", crop_pct=1.0)
MEAN_BOUND = 0.003
P999_BOUND = 0.08
NEAREST_OFF_BOUND = 0.02
"""Nearest neighbour: the largest fraction of values more than 2.5 grey levels apart."""
# (height, width): landscape, portrait, square, odd crop excesses, up- and downscaling; index 2 is grayscale.
SIZES = ((200, 300), (260, 180), (375, 500), (256, 257), (333, 500), (181, 401), (480, 640), (240, 240))
GRAY = 2


def photo(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A smooth colour field with hard-edged rectangles and a noise patch (HWC uint8).

    The edges and the noise make a wrong crop, interpolation or antialiasing visible, which a
    smooth field alone would hide.
    """
    from test_dali import smooth_image  # reused generator; importing test_dali needs DALI
    pixels = np.asarray(smooth_image(rng, height, width)).copy()
    for _ in range(6):
        y, x = rng.integers(0, height - 20), rng.integers(0, width - 20)
        pixels[y:y + rng.integers(8, 40), x:x + rng.integers(8, 40)] = rng.integers(0, 256, 3)
    y, x = rng.integers(0, height - 60), rng.integers(0, width - 60)
    pixels[y:y + 60, x:x + 60] = rng.integers(0, 256, (60, 60, 3))
    return pixels


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """train/ and val/ with the same 8 JPEGs in two classes (4 each)."""
    pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed (pip install 'rdprune[dali]')")
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate(SIZES):
        pixels = photo(rng, h, w)
        image = Image.fromarray(pixels[..., 0]) if i == GRAY else Image.fromarray(pixels)
        for split in ("train", "val"):
            (root / split / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
            image.save(root / split / f"c{i % 2}" / f"{i}.jpg", quality=92)
    return root


def dali_eval(dataset, preprocessing: Preprocessing) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole dataset through DALI's evaluation pipeline (CPU, batches of 3: the last is partial)."""
    from rdprune.data import dali
    batches = dali.eval_batches(dali.folder_samples(dataset), 3, 0, 1, torch.device("cpu"), threads=1,
                                preprocessing=preprocessing)
    xs, ys = zip(*batches)
    return torch.cat(xs), torch.cat(ys)


def torchvision_eval(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*(dataset[i] for i in range(len(dataset))))
    return torch.stack(xs), torch.tensor(ys)


def differences(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(mean, 99.9th percentile) of the absolute difference, over all pixels of all images."""
    d = (a - b).abs().flatten()
    return float(d.mean()), float(torch.quantile(d, 0.999))


def within_bounds(a: torch.Tensor, b: torch.Tensor) -> bool:
    mean, p999 = differences(a, b)
    return mean < MEAN_BOUND and p999 < P999_BOUND


@pytest.mark.parametrize("preprocessing", [RESNET, VIT, SQUASH], ids=["resnet", "vit", "squash"])
def test_dali_and_torchvision_evaluation_agree(folder, preprocessing, one_thread):
    data = build_data("imagenet", str(folder), preprocessing=preprocessing)
    assert data.preprocessing == preprocessing
    ref_x, ref_y = torchvision_eval(data.test)
    x, y = dali_eval(data.test, preprocessing)
    size = preprocessing.size
    assert x.shape == ref_x.shape == (len(SIZES), 3, size, size) and x.dtype == torch.float32
    assert torch.equal(y, ref_y) and y.dtype == torch.int64  # same labels, same order
    mean, p999 = differences(x, ref_x)
    assert mean < MEAN_BOUND and p999 < P999_BOUND, (mean, p999)
    for i in range(len(SIZES)):  # no single image is off (the set-wide mean could hide one)
        assert float((x[i] - ref_x[i]).abs().mean()) < MEAN_BOUND, i


def off_fraction(a: torch.Tensor, b: torch.Tensor, preprocessing: Preprocessing) -> float:
    """The fraction of values more than 2.5 grey levels apart."""
    level = 1 / (255 * min(preprocessing.std))
    return float(((a - b).abs() > 2.5 * level).float().mean())


def test_nearest_agrees_except_at_exact_ties(folder, one_thread):
    data = build_data("imagenet", str(folder), preprocessing=NEAREST)
    ref_x, ref_y = torchvision_eval(data.test)
    x, y = dali_eval(data.test, NEAREST)
    assert x.shape == ref_x.shape == (len(SIZES), 3, 192, 192) and torch.equal(y, ref_y)
    assert off_fraction(x, ref_x, NEAREST) < NEAREST_OFF_BOUND
    bilinear = dali_eval(data.test, Preprocessing(size=192, interpolation="bilinear", crop_pct=1.0))[0]
    assert off_fraction(bilinear, ref_x, NEAREST) > NEAREST_OFF_BOUND
    assert off_fraction(x.roll(1, -1), ref_x, NEAREST) > NEAREST_OFF_BOUND


def test_a_wrong_setting_exceeds_the_bounds(folder, one_thread):
    data = build_data("imagenet", str(folder), preprocessing=VIT)
    ref_x, _ = torchvision_eval(data.test)
    x, _ = dali_eval(data.test, VIT)
    assert within_bounds(x, ref_x)
    for wrong in (Preprocessing(224, "bilinear", 0.9, "center", VIT.mean, VIT.std),
                  Preprocessing(224, "bicubic", 0.875, "center", VIT.mean, VIT.std),
                  Preprocessing(224, "bicubic", 0.9, "squash", VIT.mean, VIT.std),
                  Preprocessing(224, "bicubic", 0.9, "center", IMAGENET_MEAN, IMAGENET_STD)):
        assert not within_bounds(dali_eval(data.test, wrong)[0], ref_x), wrong
    for name, altered in (("mirrored", x.flip(-1)), ("upside down", x.flip(-2)), ("transposed", x.transpose(-1, -2)),
                          ("shifted one pixel", x.roll(1, -1)), ("BGR", x.flip(1))):
        assert not within_bounds(altered, ref_x), name


def test_dali_calibration_follows_the_preprocessing(folder, one_thread):
    from rdprune.data import dali
    data = build_data("imagenet", str(folder), preprocessing=VIT)
    samples = dali.folder_samples(data.calibration_pool)
    images = dali.calibration_images(samples, 5, seed=0, batch_size=2, threads=1, preprocessing=VIT)
    chosen = dali.calibration_choice(len(samples), 5, seed=0)
    reference = torch.stack([data.calibration_pool[i][0] for i in chosen])
    assert images.shape == (5, 3, 224, 224) and within_bounds(images, reference)


def test_dali_training_follows_the_size_and_normalisation(folder, one_thread):
    from rdprune.data import dali
    p = Preprocessing(size=96, interpolation="bicubic", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    samples = dali.folder_samples(build_data("imagenet", str(folder), preprocessing=p).train)
    x, y = next(dali.train_batches(samples, 4, 0, 1, torch.device("cpu"), seed=0, threads=1, preprocessing=p))
    assert x.shape == (4, 3, 96, 96) and y.dtype == torch.int64
    assert -1 - 1e-5 <= float(x.min()) and float(x.max()) <= 1 + 1e-5  # (v / 255 - 0.5) / 0.5 spans [-1, 1]


def classic_eval() -> T.Compose:
    """The transforms ResNets were always evaluated with here, written out."""
    return T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def classic_train() -> T.Compose:
    return T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(),
                      T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def random_image(height: int, width: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_resnet_transforms_are_the_classic_ones():
    assert repr(eval_transform(RESNET)) == repr(classic_eval())
    assert repr(train_transform(RESNET)) == repr(classic_train())
    assert repr(eval_transform()) == repr(classic_eval())
    for h, w in ((300, 200), (181, 401), (256, 256)):
        image = random_image(h, w)
        assert torch.equal(eval_transform(RESNET)(image), classic_eval()(image))
        torch.manual_seed(3)
        ours = train_transform(RESNET)(image)
        torch.manual_seed(3)
        assert torch.equal(ours, classic_train()(image))


def test_eval_transform_resizes_by_crop_pct_and_mode():
    resize = eval_transform(VIT).transforms[0]
    assert (resize.size, resize.interpolation) == (248, T.InterpolationMode.BICUBIC)  # floor(224 / 0.9)
    squash = eval_transform(SQUASH).transforms[0]
    assert squash.size == (235, 235)  # floor(224 / 0.95), both sides
    assert eval_transform(NEAREST).transforms[0].size == 192
    assert eval_transform(VIT).transforms[-1].mean == (0.5, 0.5, 0.5)
    # A 2:1 image with a white stripe along its left edge: squash keeps the stripe (only the crop
    # margin, 6 of 235 pixels, is cut), the centre mode cuts the sides off.
    wide = np.zeros((100, 200, 3), np.uint8)
    wide[:, :20] = 255
    out = eval_transform(SQUASH)(Image.fromarray(wide))
    assert out.shape == (3, 224, 224) and float(out[0, :, 0].mean()) > 1
    assert float(eval_transform(RESNET)(Image.fromarray(wide))[0, :, 0].mean()) < 0


@pytest.mark.parametrize("preprocessing", [RESNET, VIT, SQUASH, NEAREST, Preprocessing(size=160)])
def test_transforms_output_the_model_input_size(preprocessing):
    s = preprocessing.size
    assert preprocessing.input_shape == (3, s, s)
    for h, w in ((120, 90), (300, 500), (600, 200)):
        image = random_image(h, w)
        assert eval_transform(preprocessing)(image).shape == (3, s, s)
        assert train_transform(preprocessing)(image).shape == (3, s, s)


def test_resize_size_follows_timm():
    assert [Preprocessing(size=s, crop_pct=c).resize_size for s, c in
            ((224, 0.875), (224, 0.9), (224, 0.95), (224, 1.0), (384, 1.0), (288, 0.95))] == [256, 248, 235, 224, 384, 303]
    assert all(Preprocessing(size=s, crop_pct=c).resize_size == math.floor(s / c) for s in (160, 224, 256) for c in (0.8, 0.96))


def test_crop_fraction_resizes_to_exactly_the_side_asked_for():
    """crop / resized alone floors to resized - 1 for some pairs (17 of 25 is one): the fraction is moved by its last bits."""
    assert math.floor(17 / (17 / 25)) == 24
    pairs = [(crop, resized) for crop in range(8, 400, 3) for resized in range(crop, 2 * crop)]
    assert all(Preprocessing(size=c, crop_pct=crop_fraction(c, r)).resize_size == r for c, r in pairs)
    assert crop_fraction(224, 256) == 0.875


@pytest.mark.parametrize("field, value, message", [
    ("size", 0, "size must be a positive int"),
    ("size", 224.0, "size must be a positive int"),
    ("size", True, "size must be a positive int"),
    ("interpolation", "lanczos", "interpolation must be one of bilinear, bicubic, nearest"),
    ("crop_pct", 0, r"crop_pct must be a number in \(0, 1\]"),
    ("crop_pct", 1.15, r"crop_pct must be a number in \(0, 1\]"),
    ("crop_pct", float("nan"), r"crop_pct must be a number in \(0, 1\]"),
    ("crop_mode", "border", "crop_mode must be one of center, squash"),
    ("mean", (0.5, 0.5), r"mean must be 3 numbers \(R, G, B\) in \[0, 1\]"),
    ("mean", (123.7, 116.3, 103.5), r"mean must be 3 numbers \(R, G, B\) in \[0, 1\] \(pixel values scaled to \[0, 1\], "
                                    r"not 0..255\); got \(123.7, 116.3, 103.5\)$"),
    ("std", (0.5, 0.0, 0.5), r"std must be 3 numbers \(R, G, B\) in \(0, 1\]"),
    ("std", "abc", "std must be 3 numbers"),
])
def test_nonsense_is_a_value_error(field, value, message):
    with pytest.raises(ValueError, match=rf"^Preprocessing\.{message}"):
        Preprocessing(**{field: value})


def test_lists_become_tuples_and_values_stay_hashable():
    p = Preprocessing(size=np.int64(224), mean=[0.5, 0.5, 0.5], std=np.array([0.5, 0.5, 0.5]))
    assert p.mean == (0.5, 0.5, 0.5) and p.std == (0.5, 0.5, 0.5) and type(p.std[0]) is float and type(p.size) is int
    assert {p: 1}[Preprocessing(mean=(0.5,) * 3, std=(0.5,) * 3)] == 1  # equal and same hash
    assert RESNET == Preprocessing() and RESNET.resize_size == 256


def test_imagenet_input_shape_follows_the_size(tmp_path):
    root = tmp_path / "images"
    for split in ("train", "val"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            random_image(150, 210).save(root / split / c / "0.jpg")
    default = build_data("imagenet", str(root))
    assert default.preprocessing == RESNET and default.input_shape == (3, 224, 224)
    small = Preprocessing(size=160, interpolation="bicubic", crop_pct=0.95)
    bundle = build_data("imagenet", str(root), preprocessing=small)
    assert bundle.preprocessing is small and bundle.input_shape == (3, 160, 160)
    assert bundle.test[0][0].shape == bundle.calibration_pool[1][0].shape == bundle.train[1][0].shape == (3, 160, 160)


def test_tensor_datasets_keep_their_normalisation_with_one_debug_line(caplog):
    with caplog.at_level(logging.DEBUG, logger="rdprune.data.registry"):
        plain = build_data("mnist5k")
        assert not caplog.records
        bundle = build_data("mnist5k", preprocessing=VIT)
    assert bundle.preprocessing is None and plain.preprocessing is None and bundle.input_shape == (1, 28, 28)
    assert torch.equal(bundle.test[0][0], plain.test[0][0])
    assert [r.levelno for r in caplog.records] == [logging.DEBUG]
    assert caplog.records[0].getMessage() == ("data 'mnist5k' keeps its own normalisation: the model's preprocessing "
                                              "(size 224, bicubic, crop_pct 0.9) is not applied")
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="rdprune.data.registry"):
        user = build_data("test_data:user_datasets", preprocessing=VIT)
    assert user.preprocessing is None and len(caplog.records) == 1 and "'test_data:user_datasets' keeps" in caplog.text


def test_feeding_hands_the_bundle_preprocessing_to_dali(monkeypatch):
    calls = {}

    def record(name):
        def fake(*args, **kwargs):
            calls[name] = kwargs["preprocessing"]
            return iter(())
        return fake

    for name in ("train_batches", "eval_batches", "calibration_images"):
        monkeypatch.setattr(feeding.dali, name, record(name))
    monkeypatch.setattr(feeding.dali, "folder_samples", lambda dataset: [])
    cfg = SimpleNamespace(data=SimpleNamespace(backend="dali", name="imagenet", batch_size=4, eval_batch_size=4, workers=1),
                          run=SimpleNamespace(device="cpu", seed=0),
                          calibration=SimpleNamespace(source="train", size=2, batch_size=2))
    dist = DistInfo(rank=0, world_size=1)
    for preprocessing, expected in ((VIT, VIT), (None, RESNET)):
        data = SimpleNamespace(train=None, test=None, calibration_pool=None, preprocessing=preprocessing)
        feeding.train_batches(cfg, data, dist, seed=0)
        feeding.eval_batches(cfg, data, dist)
        feeding.calibration(cfg, data)
        assert calls == dict.fromkeys(("train_batches", "eval_batches", "calibration_images"), expected)


def test_a_timm_model_named_in_the_config_preprocesses_both_backends_alike(folder, one_thread, tmp_path):
    """From the config to the batches: timm:deit_tiny's data config (bicubic, crop 0.9, ImageNet mean/std),
    sized by model.kwargs.img_size, shapes the ImageNet folder in the run, and the torchvision and DALI
    evaluation batches the loop reads agree within the bounds above."""
    pytest.importorskip("timm")
    from rdprune.config import load_config
    from rdprune.pipeline import loop
    from rdprune.pipeline.run_dir import RunLayout

    overrides = ["model.name=timm:deit_tiny_patch16_224", "model.kwargs={img_size: 64, depth: 1}", "data.name=imagenet",
                 f"data.root={folder}", "data.workers=1", "data.eval_batch_size=3", f"run.out_dir={tmp_path / 'run'}"]
    batches = {}
    for backend in ("torchvision", "dali"):
        cfg = load_config(Path(__file__).parent.parent / "configs" / "quickstart.yaml", [*overrides, f"data.backend={backend}"])
        ctx = loop._build(cfg, DistInfo(), RunLayout(cfg.out_path))
        assert ctx.data.preprocessing == Preprocessing(size=64, interpolation="bicubic", crop_pct=0.9)
        assert ctx.data.input_shape == (3, 64, 64)
        xs, ys = zip(*feeding.eval_batches(cfg, ctx.data, ctx.dist))
        batches[backend] = torch.cat(xs), torch.cat(ys)
    (ref_x, ref_y), (x, y) = batches["torchvision"], batches["dali"]
    assert torch.equal(y, ref_y) and x.shape == ref_x.shape == (len(SIZES), 3, 64, 64)
    assert within_bounds(x, ref_x), differences(x, ref_x)
    assert not (tmp_path / "run").exists()  # building checks everything and writes nothing
