"""The DALI backend in CPU mode over a generated ImageFolder of real JPEG files.

Sharding and completeness run under real torchrun with 2 ranks (gloo); an end-to-end prune +
fine-tune iteration goes through ``python -m rdprune.run`` with data.backend dali.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed (pip install 'rdprune[dali]')")

from rdprune.data import dali  # noqa: E402
from rdprune.errors import UserError  # noqa: E402

from launch import torchrun  # noqa: E402

SCRIPTS = Path(__file__).parent / "dist_scripts"
REPO = Path(__file__).parent.parent
CLASSES = ("ant", "bee", "cat")
SIZES = ((256, 320), (300, 240), (180, 200), (257, 256), (400, 290))  # (height, width), some below 224


def smooth_image(rng: np.random.Generator, height: int, width: int) -> Image.Image:
    """A smooth colour field (gradients and a blob): resampling differences stay small, unlike noise."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    channels = []
    for _ in range(3):
        a, b, c = rng.uniform(-1, 1, 3)
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (0.3 * min(height, width)) ** 2))
        channels.append(128 + 60 * (a * yy / height + b * xx / width) + 60 * c * blob)
    return Image.fromarray(np.clip(np.stack(channels, -1), 0, 255).astype(np.uint8))


def make_imagefolder(root: Path, per_class: dict[str, int], seed: int = 0) -> Path:
    """root/train and root/val, each with one folder of JPEGs per class, in varied sizes."""
    rng = np.random.default_rng(seed)
    for split, count in per_class.items():
        for c in CLASSES:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                h, w = SIZES[(i + len(c)) % len(SIZES)]
                smooth_image(rng, h, w).save(root / split / c / f"{c}_{i:03d}.jpg", quality=92)
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    # 3 x 7 = 21 training images (odd: uneven shards), 3 x 5 = 15 validation images.
    return make_imagefolder(tmp_path_factory.mktemp("imagenet"), {"train": 7, "val": 5})


def reference(path: str) -> torch.Tensor:
    """torchvision's validation transform: resize shorter side 256, centre crop 224, ImageNet normalisation."""
    from torchvision import transforms as T
    transform = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(),
                           T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    return transform(Image.open(path).convert("RGB"))


def samples_of(root: Path) -> list[tuple[str, int]]:
    from torchvision.datasets import ImageFolder
    return dali.folder_samples(ImageFolder(str(root)))


@pytest.mark.distributed
def test_two_ranks_shard_training_and_validation_exactly(folder, tmp_path):
    out = torchrun(2, str(SCRIPTS / "dali_shards.py"), str(folder), str(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    n_train, n_val = 21, 15
    for epoch in range(2):
        a, b = (set(r["epochs"][epoch]) for r in ranks)
        assert len(a) == len(ranks[0]["epochs"][epoch]) and len(b) == len(ranks[1]["epochs"][epoch])
        assert not a & b, f"epoch {epoch}: both ranks trained on {sorted(a & b)}"
        assert a | b == set(range(n_train)), f"epoch {epoch}: images missing {set(range(n_train)) - (a | b)}"
    assert ranks[0]["epochs"][0] != ranks[0]["epochs"][1], "the order did not change between epochs"
    for r in ranks:
        assert r["train_shapes"] == [str(((3, 224, 224), torch.float32, torch.int64))]
    val_y = torch.cat([r["val_y"] for r in ranks]).tolist()
    assert sorted(val_y) == list(range(n_val)), "validation must see every image exactly once"
    assert ranks[0]["val_y"].dtype == torch.int64
    val_x = torch.cat([r["val_x"] for r in ranks])
    assert val_x.shape == (n_val, 3, 224, 224) and val_x.dtype == torch.float32
    paths = [p for p, _ in samples_of(folder / "val")]
    for x, i in zip(val_x, val_y):
        ref = reference(paths[i])
        # Same decoder family and bilinear resampling: differences are small interpolation noise.
        assert (x - ref).abs().mean() < 0.01, (paths[i], float((x - ref).abs().mean()))
        assert (x - ref).abs().max() < 0.1, (paths[i], float((x - ref).abs().max()))
    assert torch.equal(ranks[0]["calibration"], ranks[1]["calibration"]), "calibration differs across ranks"


def test_calibration_is_seeded_unaugmented_and_checked(folder, one_thread):
    samples = samples_of(folder / "train")
    first = dali.calibration_images(samples, 4, seed=1, batch_size=3, threads=1)
    assert first.shape == (4, 3, 224, 224) and first.dtype == torch.float32
    assert torch.equal(first, dali.calibration_images(samples, 4, seed=1, batch_size=4, threads=1))
    chosen = dali.calibration_choice(len(samples), 4, seed=1)
    for x, i in zip(first, chosen):
        assert (x - reference(samples[i][0])).abs().mean() < 0.01
    assert dali.calibration_choice(len(samples), 4, seed=2) != chosen
    with pytest.raises(UserError, match=r"^calibration.size 22 is larger than the 21 training images"):
        dali.calibration_images(samples, 22, seed=1, batch_size=4, threads=1)


def test_bad_files_are_named_before_decoding(tmp_path):
    root = make_imagefolder(tmp_path / "data", {"train": 2})
    good = sorted((root / "train" / "ant").glob("*.jpg"))[0]
    truncated = root / "train" / "bee" / "cut.jpg"
    truncated.write_bytes(good.read_bytes()[:2000])
    samples = samples_of(root / "train")
    with pytest.raises(UserError, match=r"cut.jpg is a truncated JPEG \(no end marker\); remove or replace it$"):
        dali.check_image_files([p for p, _ in samples])
    truncated.unlink()
    (root / "train" / "cat" / "notes.jpg").write_text("not an image")
    with pytest.raises(UserError, match=r"notes.jpg is not an image DALI can decode"):
        dali.train_batches(samples_of(root / "train"), 2, 0, 1, torch.device("cpu"), seed=0, threads=1).__next__()
    # PNG is a format DALI decodes: no complaint.
    (root / "train" / "cat" / "notes.jpg").unlink()
    Image.open(good).save(root / "train" / "cat" / "png.png")
    dali.check_image_files([p for p, _ in samples_of(root / "train")])


def test_decoding_failure_names_the_file(tmp_path):
    # A JPEG with an end marker but a corrupt body passes the cheap check; DALI's error is translated.
    root = make_imagefolder(tmp_path / "data", {"val": 1})
    path = sorted((root / "val" / "bee").glob("*.jpg"))[0]
    data = bytearray(path.read_bytes())
    data[200:len(data) - 2] = b"\x00" * (len(data) - 202)
    path.write_bytes(bytes(data))
    batches = dali.eval_batches(samples_of(root / "val"), 3, 0, 1, torch.device("cpu"), threads=1)
    with pytest.raises(UserError, match=rf"cannot decode {path}"):
        list(batches)


def test_missing_dali_is_a_user_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)
    with pytest.raises(UserError, match=r"^data.backend 'dali' needs NVIDIA DALI: pip install 'rdprune\[dali\]' "
                                        r"\(or nvidia-dali-cuda120\)$"):
        dali.require_dali()
    assert not dali.dali_available()


def test_non_folder_dataset_is_refused():
    with pytest.raises(UserError, match="reads image folders, but the dataset is a TensorDataset"):
        dali.folder_samples(torch.utils.data.TensorDataset(torch.zeros(2)))


E2E = ("model.name=dali_tiny:tiny", "data.name=imagenet", "data.backend=dali", "data.batch_size=8",
       "data.eval_batch_size=8", "data.workers=1", "pretrain.steps=4", "finetune.steps=3", "prune.levels=11",
       "prune.target_sparsity=0.5", "prune.amount_per_iteration=0.5", "calibration.size=8",
       "calibration.batch_size=4", "run.progress=false", "run.device=cpu")


@pytest.mark.slow
@pytest.mark.distributed
def test_prune_and_finetune_through_dali_under_torchrun(folder, tmp_path):
    out = torchrun(2, "-m", "rdprune.run", "configs/quickstart.yaml", *E2E, f"data.root={folder}",
                   f"run.out_dir={tmp_path / 'run'}", paths=(SCRIPTS,))
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1] and rows[1]["target_sparsity"] == 0.5
    assert rows[1]["sparsity"] >= 0.49
    # 15 validation images: accuracy is a multiple of 1/15, so every image counted exactly once.
    for r in rows:
        assert abs(r["top1"] * 15 / 100 - round(r["top1"] * 15 / 100)) < 1e-6, r


def test_cli_reports_bad_input_in_one_line_with_exit_2(tmp_path):
    root = make_imagefolder(tmp_path / "data", {"train": 2, "val": 1})
    cli = [sys.executable, "-m", "rdprune.run", "configs/quickstart.yaml", *E2E, f"data.root={root}"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SCRIPTS), str(REPO)])}
    out = subprocess.run([*cli, "calibration.size=7", f"run.out_dir={tmp_path / 'run1'}"],
                         capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert out.returncode == 2 and "calibration.size 7 is larger than the 6 training images" in out.stderr, out.stderr
    bad = sorted((root / "val" / "cat").glob("*.jpg"))[0]
    bad.write_bytes(bad.read_bytes()[:500])
    out = subprocess.run([*cli, f"run.out_dir={tmp_path / 'run2'}"], capture_output=True, text=True, cwd=REPO,
                         env=env, timeout=300)
    assert out.returncode == 2 and f"{bad} is a truncated JPEG" in out.stderr, out.stderr
    assert out.stderr.count("rdprune: error:") == 1 and "Traceback" not in out.stderr, out.stderr
