"""Everything that crosses ranks: the collectives (:mod:`.collectives`, re-exported here), the
sharding plan of curve work (:mod:`.sharding`) and curve estimation by all ranks together
(:mod:`.sharded_curves`). No other module of rdprune calls ``torch.distributed``."""
from rdprune.distributed.collectives import (
    DistInfo,
    PeerFailureError,
    RankMismatchError,
    all_reduce_sum,
    barrier,
    broadcast_object,
    broadcast_tensors_,
    check_identical,
    check_same_config,
    distributed_session,
    fingerprint,
    first_to_report,
    gather_objects,
    init_distributed,
    record,
    setup_logging,
    teardown,
    wrap_ddp,
)

__all__ = [
    "DistInfo", "PeerFailureError", "RankMismatchError", "all_reduce_sum", "barrier", "broadcast_object",
    "broadcast_tensors_", "check_identical", "check_same_config", "distributed_session", "fingerprint", "first_to_report",
    "gather_objects", "init_distributed", "record", "setup_logging", "teardown", "wrap_ddp",
]
