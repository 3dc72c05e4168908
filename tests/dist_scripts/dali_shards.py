"""Under torchrun: each rank's DALI training epochs, validation pass and calibration set, saved for the test.

Labels are replaced by sample indices so the test can tell every image apart.
Usage: dali_shards.py IMAGEFOLDER_ROOT OUT_DIR
"""
import sys
from pathlib import Path

import torch
from torchvision.datasets import ImageFolder

from rdprune import distributed as d
from rdprune.data import dali

BATCH = 3
EPOCHS = 2


@d.record
def main() -> None:
    root, out = Path(sys.argv[1]), Path(sys.argv[2])
    info = d.init_distributed("cpu", timeout_s=60)
    try:
        r, w = info.rank, info.world_size
        train = [(p, i) for i, (p, _) in enumerate(ImageFolder(str(root / "train")).samples)]
        val = [(p, i) for i, (p, _) in enumerate(ImageFolder(str(root / "val")).samples)]
        shard = (r + 1) * len(train) // w - r * len(train) // w  # DALI's shard of this rank
        epochs, batches = [], dali.train_batches(train, BATCH, r, w, info.device, seed=5, threads=1)
        shapes = set()
        for _ in range(EPOCHS):
            seen = []
            while len(seen) < shard:
                x, y = next(batches)
                shapes.add((tuple(x.shape[1:]), x.dtype, y.dtype))
                seen += y.tolist()
            epochs.append(seen)
        xs, ys = zip(*dali.eval_batches(val, BATCH, r, w, info.device, threads=1))
        calib = dali.calibration_images(train, 5, seed=3, batch_size=2, threads=1)
        torch.save({"epochs": epochs, "train_shapes": sorted(map(str, shapes)), "val_x": torch.cat(xs),
                    "val_y": torch.cat(ys), "calibration": calib}, out / f"rank{r}.pt")
    finally:
        d.teardown()


if __name__ == "__main__":
    main()
