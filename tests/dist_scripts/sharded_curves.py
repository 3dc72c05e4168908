"""Under torchrun: curves of a small pre-pruned CNN estimated by all ranks; rank 0 saves them.

Usage: sharded_curves.py OUT.pt CACHE_DIR GRID WORST_CASE(0|1)
"""
import sys

import torch

from rdprune import distributed as d
from rdprune.core.distortion import Distortion
from rdprune.distributed.sharded_curves import sharded_curves

from tiny_models import Branchy


def setup() -> tuple[torch.nn.Module, torch.Tensor]:
    """The model and inputs every rank (and the single-process reference) builds from the same seed."""
    torch.manual_seed(0)
    model = Branchy()
    from rdprune.core.masks import apply_masks

    apply_masks(model, {"stem": 0.5, "left": 0.9})  # iterative pruning: some levels prune nothing new
    return model, torch.randn(20, 3, 8, 8)


@d.record
def main() -> None:
    out, cache_dir, grid, distortion = sys.argv[1], sys.argv[2], sys.argv[3], Distortion.named(sys.argv[4])
    torch.set_num_threads(1)
    with d.distributed_session("cpu", timeout_s=120) as info:
        model, inputs = setup()
        curves = sharded_curves(model, inputs, 11, grid=grid, distortion=distortion, skip=(), batch_size=8,
                                cache_dir=cache_dir if cache_dir != "-" else None, dist=info, progress=False)
        if info.rank == 0:
            torch.save({n: (torch.from_numpy(c.amounts), torch.from_numpy(c.distortion)) for n, c in curves.items()}, out)
        else:
            assert curves is None


if __name__ == "__main__":
    main()
