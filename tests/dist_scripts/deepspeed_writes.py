"""``python -m rdprune.run`` under torchrun with every write of this rank counted, DeepSpeed's own checkpoint
writes included, and the process killed before one of them.

Environment: ``RDPRUNE_WRITES`` (a folder: each rank appends the files it writes, in order, to
``writes.rank<r>``), ``RDPRUNE_KILL_AT`` (optional, ``<rank>:<k>``: that rank dies with exit code 137,
as under kill -9, before its k-th write). The arguments are rdprune.run's.
"""
import os
import sys
from pathlib import Path

import rdprune.files
from rdprune.cli.common import run_cli
from rdprune.run import main


def _counted() -> None:
    rank = int(os.environ.get("RANK", "0"))
    log = Path(os.environ["RDPRUNE_WRITES"]) / f"writes.rank{rank}"
    kill_rank, kill_at = (int(v) for v in os.environ.get("RDPRUNE_KILL_AT", "-1:0").split(":"))
    count = [0]

    def before_write(path) -> None:
        count[0] += 1
        if rank == kill_rank and count[0] == kill_at:
            os._exit(137)
        with open(log, "a") as f:
            f.write(f"{path}\n")

    real = rdprune.files._atomic_write

    def atomic_write(path, write) -> None:
        before_write(path)
        real(path, write)

    rdprune.files._atomic_write = atomic_write

    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    real_save = TorchCheckpointEngine.save

    def save(self, state_dict, path: str):
        before_write(path)
        return real_save(self, state_dict, path)

    TorchCheckpointEngine.save = save


if __name__ == "__main__":
    _counted()
    run_cli(main, sys.argv[1:])
