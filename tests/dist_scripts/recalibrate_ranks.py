"""Under torchrun: every rank re-estimates BatchNorm statistics of the same pruned model on its own.

The images come from the pipeline's feeding (the same seeded draw on every rank); the statistics
must change, and all ranks must hold identical buffers without any broadcast.
Usage: recalibrate_ranks.py CONFIG [section.key=value ...]
"""
import sys

import torch

from rdprune import distributed as d
from rdprune.config import load_config
from rdprune.core.batchnorm import recalibrate_batchnorm
from rdprune.core.masks import apply_masks
from rdprune.pipeline import feeding
from rdprune.pipeline import loop as pipeline
from rdprune.pipeline.run_dir import RunLayout


@d.record
def main() -> None:
    cfg = load_config(sys.argv[1], sys.argv[2:])
    torch.set_num_threads(1)
    with d.distributed_session("cpu", timeout_s=300) as info:
        ctx = pipeline._build(cfg, info, RunLayout(cfg.out_path))
        apply_masks(ctx.model, {n: 0.7 for n in ctx.layers}, ctx.layers)
        before = [b.clone() for b in ctx.model.buffers()]
        images = feeding.recalibration(cfg, ctx.data)
        d.check_identical(images, "the recalibration images")
        names = recalibrate_batchnorm(ctx.model, images, batch_size=cfg.calibration.batch_size)
        assert len(names) == 19, names  # ResNet-20: stem + 18 block BatchNorms
        assert any(not torch.equal(a, b) for a, b in zip(before, ctx.model.buffers()))
        d.check_identical(ctx.model.state_dict(), "the recalibrated model state")
        print(f"recalibration ok on rank {info.rank}", flush=True)


if __name__ == "__main__":
    main()
