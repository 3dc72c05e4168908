"""Data registry: the bundled digits, real-format CIFAR/ImageFolder trees, calibration and sharded loaders."""
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset, TensorDataset

from rdprune.core.curves import synthetic_inputs
from rdprune.data import DATASET_NAMES, DataBundle, build_data, calibration_inputs, infinite_batches, train_loader
from rdprune.data.mnist5k import load_mnist5k
from rdprune.distributed import DistInfo
from rdprune.errors import UserError
from rdprune.pipeline.feeding import rank_subset


@pytest.fixture(scope="module")
def mnist():
    return build_data("mnist5k")


def _keys(dataset):
    """Each image's bytes: identifies a digit independently of its position."""
    return {dataset.images[i].numpy().tobytes() for i in range(len(dataset))}


def test_mnist5k_split_is_stratified_disjoint_and_fixed(mnist):
    assert (len(mnist.train), len(mnist.test), mnist.input_shape, mnist.num_classes) == (4000, 1000, (1, 28, 28), 10)
    assert torch.bincount(mnist.train.targets).tolist() == [400] * 10
    assert torch.bincount(mnist.test.targets).tolist() == [100] * 10
    assert not _keys(mnist.train) & _keys(mnist.test)
    other = build_data("mnist5k", seed=123)
    assert torch.equal(other.test.images, mnist.test.images) and torch.equal(other.train.images, mnist.train.images)
    assert torch.equal(other.test.targets, mnist.test.targets)


def test_mnist5k_split_mixes_the_class_sorted_file(mnist):
    _, labels = load_mnist5k()
    assert labels[:500].eq(0).all()  # the file is sorted by class: a head/tail split would be wrong
    images, _ = load_mnist5k()
    first_zeros = {images[i].numpy().tobytes() for i in range(400)}
    assert first_zeros != {mnist.train.images[i].numpy().tobytes() for i in range(400)}


def test_mnist5k_normalisation_and_pool(mnist):
    test_images = torch.stack([mnist.test[i][0] for i in range(len(mnist.test))])
    assert test_images.min() == pytest.approx(-0.1307 / 0.3081, abs=1e-4)
    assert test_images.max() == pytest.approx((1 - 0.1307) / 0.3081, abs=1e-4)
    assert abs(test_images.mean().item()) < 0.2 and 0.8 < test_images.std().item() < 1.2
    assert len(mnist.calibration_pool) == len(mnist.train)
    for i in (0, 7, 3999):  # the pool is the training digits, normalised, never shifted
        raw = mnist.train.images[i].float() / 255
        assert torch.allclose(mnist.calibration_pool[i][0], (raw - 0.1307) / 0.3081)
    assert mnist.calibration_pool[7][1] == mnist.train[7][1]


def test_calibration_inputs_are_chosen_by_the_seed(mnist):
    a = calibration_inputs(mnist.calibration_pool, 64, seed=1)
    assert a.shape == (64, 1, 28, 28)
    assert torch.equal(a, calibration_inputs(mnist.calibration_pool, 64, seed=1))
    assert not torch.equal(a, calibration_inputs(mnist.calibration_pool, 64, seed=2))


def test_calibration_size_too_large(mnist):
    with pytest.raises(UserError) as err:
        calibration_inputs(mnist.calibration_pool, 5000, seed=0)
    assert str(err.value) == ("calibration.size is 5000, but the calibration pool has 4000 images; "
                              "choose a size from 1 to 4000")


def test_synthetic_inputs_are_standard_normal_and_seeded():
    x = synthetic_inputs(256, (3, 8, 8), seed=0)
    assert x.shape == (256, 3, 8, 8) and abs(x.mean().item()) < 0.05 and abs(x.std().item() - 1) < 0.05
    assert torch.equal(x, synthetic_inputs(256, (3, 8, 8), seed=0))
    assert not torch.equal(x, synthetic_inputs(256, (3, 8, 8), seed=1))


class Indices(Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return torch.tensor(i), 0


def test_two_ranks_split_the_training_data():
    seen = []
    for rank in (0, 1):
        loader = train_loader(Indices(100), 10, seed=3, rank=rank, world_size=2)
        seen.append([int(i) for x, _ in loader for i in x])
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(100))
    assert seen[0] != sorted(seen[0])


def test_evaluation_shards_cover_odd_sizes_exactly():
    test_set = Indices(101)
    seen = [int(test_set[i][0]) for rank in (0, 1) for i in rank_subset(test_set, DistInfo(rank=rank, world_size=2)).indices]
    assert sorted(seen) == list(range(101))


def test_single_process_shuffle_is_seeded_and_changes_per_epoch():
    def first_epochs(seed):
        stream = infinite_batches(train_loader(Indices(40), 8, seed=seed))
        return [int(i) for _ in range(10) for i in next(stream)[0]]  # two epochs

    a = first_epochs(5)
    assert a == first_epochs(5) and a != first_epochs(6)
    assert sorted(a[:40]) == list(range(40)) and a[:40] != a[40:]


def test_batch_larger_than_the_data():
    with pytest.raises(UserError, match="batch size per rank"):
        train_loader(Indices(10), 8, seed=0, world_size=2)


def _write_cifar(folder, n_train=6, n_test=4):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        n = n_test if name == "test_batch" else n_train
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": rng.integers(0, 10, n).tolist(),
                 b"batch_label": name.encode()}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    return folder


def test_cifar10_from_real_format_pickles(tmp_path):
    folder = _write_cifar(tmp_path / "cifar-10-batches-py")
    for root in (tmp_path, folder):  # the folder itself or its parent
        bundle = build_data("cifar10", str(root))
        assert (len(bundle.train), len(bundle.test), bundle.input_shape, bundle.num_classes) == (30, 4, (3, 32, 32), 10)
    with open(folder / "data_batch_2", "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    pool_image, label = bundle.calibration_pool[6]  # first image of data_batch_2
    expected = torch.from_numpy(raw[b"data"][0]).view(3, 32, 32).float() / 255
    mean, std = torch.tensor([0.4914, 0.4822, 0.4465]).view(3, 1, 1), torch.tensor([0.2470, 0.2435, 0.2616]).view(3, 1, 1)
    assert torch.allclose(pool_image * std + mean, expected, atol=1e-6) and label == raw[b"labels"][0]
    torch.manual_seed(0)
    augmented = [bundle.train[6][0] for _ in range(8)]
    assert all(a.shape == (3, 32, 32) for a in augmented)
    assert any(not torch.equal(a, pool_image) for a in augmented)


def test_cifar10_missing_folder_and_files(tmp_path):
    with pytest.raises(UserError) as err:
        build_data("cifar10", str(tmp_path))
    assert str(err.value).startswith(
        f"data.root '{tmp_path}' is not a CIFAR-10 folder: expected cifar-10-batches-py/ with data_batch_1..5 "
        "and test_batch (the python version from https://www.cs.toronto.edu/~kriz/cifar.html); missing: data_batch_1,"
    )
    folder = _write_cifar(tmp_path / "cifar-10-batches-py")
    (folder / "test_batch").unlink()
    with pytest.raises(UserError, match="; missing: test_batch$"):
        build_data("cifar10", str(tmp_path))


def test_cifar10_corrupt_pickle_names_the_file(tmp_path):
    folder = _write_cifar(tmp_path / "cifar-10-batches-py")
    (folder / "data_batch_3").write_bytes(b"\x80\x02garbage")
    with pytest.raises(UserError) as err:
        build_data("cifar10", str(folder))
    assert str(err.value).startswith(f"CIFAR-10 file {folder / 'data_batch_3'} is not a readable CIFAR python pickle: ")


def test_cifar10_pickle_cannot_run_code(tmp_path):
    folder = _write_cifar(tmp_path / "cifar-10-batches-py")
    with open(folder / "data_batch_1", "wb") as f:
        pickle.dump({b"data": print}, f)
    with pytest.raises(UserError, match="refusing to load builtins.print"):
        build_data("cifar10", str(folder))


def _write_imagefolder(root, classes=("cat", "dog", "eel"), per_class=2):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                size = (int(rng.integers(40, 300)), int(rng.integers(40, 300)))
                pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"{i}.JPEG")
    return root


def test_imagenet_from_a_tiny_imagefolder(tmp_path):
    root = _write_imagefolder(tmp_path)
    (root / "train" / "cat" / ".DS_Store").write_bytes(b"x")  # hidden files are ignored
    bundle = build_data("imagenet", str(root))
    assert (len(bundle.train), len(bundle.test), bundle.input_shape, bundle.num_classes) == (6, 6, (3, 224, 224), 3)
    image, label = bundle.train[5]
    assert image.shape == (3, 224, 224) and label == 2
    assert torch.equal(bundle.calibration_pool[3][0], bundle.calibration_pool[3][0])
    assert bundle.calibration_pool[3][0].shape == bundle.test[0][0].shape == (3, 224, 224)
    assert bundle.calibration_pool.samples == bundle.train.samples


def test_imagenet_layout_errors(tmp_path):
    with pytest.raises(UserError, match=r"is not an ImageNet folder: missing train/; expected train/<class>/"):
        build_data("imagenet", str(tmp_path))
    root = _write_imagefolder(tmp_path / "a")
    (root / "train" / "dog" / "notes.txt").write_text("hello")
    with pytest.raises(UserError) as err:
        build_data("imagenet", str(root))
    assert str(err.value).startswith(f"file {root / 'train' / 'dog' / 'notes.txt'} is not an image (allowed extensions: ")
    root = _write_imagefolder(tmp_path / "b")
    (root / "train" / "fox").mkdir()
    with pytest.raises(UserError) as err:
        build_data("imagenet", str(root))
    assert str(err.value) == f"class folder {root / 'train' / 'fox'} has no images; every class needs at least one"


def test_imagenet_truncated_jpeg_is_named_when_decoded(tmp_path):
    root = _write_imagefolder(tmp_path)
    path = root / "val" / "dog" / "1.JPEG"
    path.write_bytes(path.read_bytes()[:200])
    bundle = build_data("imagenet", str(root))
    with pytest.raises(UserError, match=rf"^image {path} cannot be decoded: "):
        bundle.test[3]


def test_unknown_dataset_name():
    with pytest.raises(UserError) as err:
        build_data("mnist60k")
    assert str(err.value) == ("unknown dataset 'mnist60k': choose one of " + ", ".join(DATASET_NAMES)
                              + ", or give an import path 'package.module:callable'")


def user_datasets(root=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    train = TensorDataset(torch.randn(12, 2, 5, 5, generator=g), torch.arange(12) % 4)
    return train, TensorDataset(torch.randn(4, 2, 5, 5), torch.arange(4))


def test_user_dataset_by_import_path():
    bundle = build_data("test_data:user_datasets", seed=1)
    assert isinstance(bundle, DataBundle)
    assert (bundle.input_shape, bundle.num_classes, len(bundle.train)) == ((2, 5, 5), 4, 12)
    assert bundle.calibration_pool is bundle.train


def test_user_dataset_failing_import():
    with pytest.raises(UserError) as err:
        build_data("no_such_pkg:make")
    assert str(err.value) == "data 'no_such_pkg:make': cannot import module 'no_such_pkg' (No module named 'no_such_pkg')"
