"""Everything that crosses ranks: the collectives (:mod:`.collectives`, re-exported here), the
sharding plan of curve work (:mod:`.sharding`) and curve estimation by all ranks together
(:mod:`.sharded_curves`). No other module of rdprune calls ``torch.distributed``."""
from __future__ import annotations

from rdprune.lazy import lazy_exports

_LAZY = {
    "DistInfo": "rdprune.distributed.collectives:DistInfo",
    "PeerFailureError": "rdprune.distributed.collectives:PeerFailureError",
    "RankMismatchError": "rdprune.distributed.collectives:RankMismatchError",
    "all_reduce_sum": "rdprune.distributed.collectives:all_reduce_sum",
    "barrier": "rdprune.distributed.collectives:barrier",
    "broadcast_object": "rdprune.distributed.collectives:broadcast_object",
    "broadcast_tensors_": "rdprune.distributed.collectives:broadcast_tensors_",
    "check_identical": "rdprune.distributed.collectives:check_identical",
    "check_same_config": "rdprune.distributed.collectives:check_same_config",
    "distributed_session": "rdprune.distributed.collectives:distributed_session",
    "fingerprint": "rdprune.distributed.collectives:fingerprint",
    "first_to_report": "rdprune.distributed.collectives:first_to_report",
    "gather_objects": "rdprune.distributed.collectives:gather_objects",
    "init_distributed": "rdprune.distributed.collectives:init_distributed",
    "record": "rdprune.distributed.collectives:record",
    "setup_logging": "rdprune.distributed.collectives:setup_logging",
    "teardown": "rdprune.distributed.collectives:teardown",
    "wrap_ddp": "rdprune.distributed.collectives:wrap_ddp",
}
"""Public names and where they live, imported on first use: the config reads this package's
light ``choices`` module without importing torch."""


__getattr__ = lazy_exports(__name__, _LAZY)


__all__ = [
    "DistInfo", "PeerFailureError", "RankMismatchError", "all_reduce_sum", "barrier", "broadcast_object",
    "broadcast_tensors_", "check_identical", "check_same_config", "distributed_session", "fingerprint", "first_to_report",
    "gather_objects", "init_distributed", "record", "setup_logging", "teardown", "wrap_ddp",
]
