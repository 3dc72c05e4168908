"""Everything that crosses ranks: the collectives (:mod:`.collectives`, re-exported here), the
sharding plan of curve work (:mod:`.sharding`) and curve estimation by all ranks together
(:mod:`.sharded_curves`). No other module of rdprune calls ``torch.distributed``."""
from __future__ import annotations

import importlib

_LAZY = {
    "DistInfo": "rdprune.distributed.collectives",
    "PeerFailureError": "rdprune.distributed.collectives",
    "RankMismatchError": "rdprune.distributed.collectives",
    "all_reduce_sum": "rdprune.distributed.collectives",
    "barrier": "rdprune.distributed.collectives",
    "broadcast_object": "rdprune.distributed.collectives",
    "broadcast_tensors_": "rdprune.distributed.collectives",
    "check_identical": "rdprune.distributed.collectives",
    "check_same_config": "rdprune.distributed.collectives",
    "distributed_session": "rdprune.distributed.collectives",
    "fingerprint": "rdprune.distributed.collectives",
    "first_to_report": "rdprune.distributed.collectives",
    "gather_objects": "rdprune.distributed.collectives",
    "init_distributed": "rdprune.distributed.collectives",
    "record": "rdprune.distributed.collectives",
    "setup_logging": "rdprune.distributed.collectives",
    "teardown": "rdprune.distributed.collectives",
    "wrap_ddp": "rdprune.distributed.collectives",
}
"""Public names and their modules, imported on first use: the config reads this package's
light ``choices`` module without importing torch."""


def __getattr__(name: str) -> object:
    if name in _LAZY:
        value = globals()[name] = getattr(importlib.import_module(_LAZY[name]), name)
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DistInfo", "PeerFailureError", "RankMismatchError", "all_reduce_sum", "barrier", "broadcast_object",
    "broadcast_tensors_", "check_identical", "check_same_config", "distributed_session", "fingerprint", "first_to_report",
    "gather_objects", "init_distributed", "record", "setup_logging", "teardown", "wrap_ddp",
]
