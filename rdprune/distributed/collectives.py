"""Process groups and collectives: the only module of rdprune that imports ``torch.distributed``.

A process started without torchrun or srun is a world of size 1 with no process group, and every
function here is then a no-op or trivial, so the pipeline calls them unconditionally. A lone
process can be given a process group of its own (``single_group``: DeepSpeed needs one, and
``distributed.force_process_group`` asks for one to run the multi-process path, DDP and NCCL
included, on one GPU); the collectives and DDP then go through it at world size 1.

Failure behaviour: decorate the entry point with :func:`record`. A rank that raises posts
"rank r: error" to the rendezvous store before it leaves; a rank whose collective then breaks
raises :class:`PeerFailureError` quoting it, so every rank's error names the rank that failed
first and why (torchrun's own summary picks its "root cause" by one-second timestamps, lower rank
first on ties, and can blame an innocent rank). The torchrun agent stops the remaining ranks, and
every collective carries the configured timeout, so no rank waits forever on a dead peer.
"""
from __future__ import annotations

import datetime
import functools
import hashlib
import logging
import os
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.elastic.multiprocessing import errors as elastic_errors

from rdprune import registry
from rdprune.errors import UserError

__all__ = [
    "DistInfo", "RankMismatchError", "PeerFailureError", "init_distributed", "teardown", "distributed_session", "barrier",
    "broadcast_object", "broadcast_tensors_", "gather_objects", "all_reduce_sum", "fingerprint", "check_identical",
    "check_same_config", "several_ranks", "wrap_ddp", "setup_logging", "record", "first_to_report", "check_precision",
]

log = logging.getLogger(__name__)

DEFAULT_MASTER_PORT = 29500
FAILURE_KEY = "rdprune/first_failure"
PEER_FAILURE_WAIT_S = 5.0  # how long a broken collective waits for the failing rank's note
AGENT_STORE_TIMEOUT_S = 10.0  # how long a worker without a process group tries to reach torchrun's store


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: its rank, the world size, and the device it computes on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None  # None when there is no process group (world size 1)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


class RankMismatchError(RuntimeError):
    """Ranks hold different values of something that must be identical on all of them."""


class PeerFailureError(RuntimeError):
    """A collective broke because another rank failed first; the message says which and why."""


def _launch_env(env: Mapping[str, str]) -> tuple[int, int, int, dict[str, str]] | None:
    """(rank, world, local rank, env vars to set) from torchrun's or srun's variables, else None.

    torchrun wins over SLURM, because ``srun torchrun`` sets both and torchrun's describe the
    worker. SLURM alone counts only inside an srun step (SLURM_STEP_NUM_TASKS): a batch script
    run directly is one process even when the allocation holds many tasks.
    """
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)), {}
    if "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env:
        world = int(env["SLURM_STEP_NUM_TASKS"])
        extra = {
            "MASTER_ADDR": env.get("MASTER_ADDR") or _slurm_head_address(env.get("SLURM_JOB_NODELIST", "")),
            # Distinct jobs sharing a head node must not collide on one port.
            "MASTER_PORT": env.get("MASTER_PORT") or str(DEFAULT_MASTER_PORT + int(env.get("SLURM_JOB_ID", 0)) % 10000),
        }
        return int(env["SLURM_PROCID"]), world, int(env.get("SLURM_LOCALID", 0)), extra
    return None


def _slurm_head_address(nodelist: str) -> str:
    """Address of the first node of a SLURM node list (``node[01-04]`` syntax expanded by scontrol).

    The node's NodeAddr is preferred over its name, which need not resolve (emulated nodes).
    """
    try:
        hosts = subprocess.run(["scontrol", "show", "hostnames", nodelist], check=True,
                               capture_output=True, text=True, timeout=30).stdout.split()
    except (OSError, subprocess.SubprocessError) as e:
        raise UserError(f"started by srun without torchrun, but 'scontrol show hostnames' failed ({e}); "
                        "set MASTER_ADDR or launch with torchrun") from e
    if not hosts:
        raise UserError(f"SLURM_JOB_NODELIST {nodelist!r} names no host; set MASTER_ADDR or launch with torchrun")
    try:
        node = subprocess.run(["scontrol", "show", "node", hosts[0]], check=True,
                              capture_output=True, text=True, timeout=30).stdout
        addr = next((w.split("=", 1)[1] for w in node.split() if w.startswith("NodeAddr=")), "")
    except (OSError, subprocess.SubprocessError):
        addr = ""
    return addr or hosts[0]


def _select_device(device: str, local_rank: int) -> torch.device:
    if device not in registry.DEVICES:  # read on use: a plug-in imported by the registry may import this module
        raise UserError(f"device must be one of {', '.join(registry.DEVICES.names())}, got {device!r}")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if not use_cuda:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError("run.device 'cuda' was asked for, but CUDA is not available here (torch.cuda.is_available() is False); "
                        "use run.device 'cpu' or 'auto'")
    if local_rank >= torch.cuda.device_count():
        raise UserError(f"local rank {local_rank} has no GPU: this node has {torch.cuda.device_count()}; "
                        "start at most that many processes per node")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def check_precision(precision: str, device: torch.device) -> None:
    """Refuse, before any work, a training precision this device cannot run: bf16 needs a GPU with
    native bf16 (compute capability 8.0 or later; older GPUs only emulate it, slowly)."""
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        name = torch.cuda.get_device_name(device)
        major, minor = torch.cuda.get_device_capability(device)
        raise UserError(f"distributed.precision 'bf16' needs a GPU with native bf16 (compute capability 8.0 or later), "
                        f"but {device} is a {name} ({major}.{minor}); use distributed.precision 'fp32'")


def init_distributed(device: str = "auto", timeout_s: float = 600.0, *, single_group: bool = False) -> DistInfo:
    """Join the process group described by torchrun's or srun's environment (or none: world 1).

    NCCL on CUDA (after selecting the local GPU), gloo on CPU. ``timeout_s`` bounds every
    collective, so a rank whose peer died fails instead of hanging. ``single_group`` gives a lone
    process a group of its own (in-memory store), for engines such as DeepSpeed that need one.
    """
    launch = _launch_env(os.environ)
    if launch is None or launch[1] == 1:
        rank, world, local_rank = (0, 1, 0) if launch is None else launch[:3]
        dev = _select_device(device, local_rank)
        if not single_group:
            return DistInfo(rank, world, local_rank, dev, None)
        backend = "nccl" if dev.type == "cuda" else "gloo"
        os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": str(local_rank)})
        if not dist.is_initialized():
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1,
                                    timeout=datetime.timedelta(seconds=timeout_s))
        return DistInfo(0, 1, local_rank, dev, backend)
    rank, world, local_rank, extra = launch
    os.environ.update(extra)
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(local_rank)})
    dev = _select_device(device, local_rank)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        dist.init_process_group(backend=backend, store=_job_store(rank, world, timeout), rank=rank,
                                world_size=world, timeout=timeout)
    log.info("process group up: %d ranks, backend %s, device %s", world, backend, dev)
    return DistInfo(rank, world, local_rank, dev, backend)


def _job_store(rank: int, world: int, timeout: datetime.timedelta) -> dist.Store:
    """The job's key-value store (``MASTER_ADDR:MASTER_PORT``), under a prefix of this launch attempt.

    torchrun's agent keeps one store across restarts: without a prefix per attempt, restarted
    workers read the dead workers' gloo addresses (and failure notes) and wait for them.
    """
    store, _, _ = next(dist.rendezvous("env://", rank=rank, world_size=world, timeout=timeout))
    return dist.PrefixStore(f"rdprune/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def teardown() -> None:
    """Leave the process group; safe to call twice, and without one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def distributed_session(device: str = "auto", timeout_s: float = 600.0, *, single_group: bool = False) -> Iterator[DistInfo]:
    """``init_distributed`` on entry, ``teardown`` on every exit; an error is announced to the peers first.

    On success every rank waits for the others before leaving the group: a rank that tears down
    while a peer still talks to it can make that peer abort at exit.
    """
    try:
        yield init_distributed(device, timeout_s, single_group=single_group)
        barrier()
    except BaseException as e:
        first = _announce_failure(e)
        # A collective outside this module (DDP's gradient all-reduce) broke because a peer failed first.
        if isinstance(e, (RuntimeError, ConnectionError)) and not isinstance(e, PeerFailureError) and first \
                and not first.startswith(f"rank {dist.get_rank()} "):
            raise PeerFailureError(f"rank {dist.get_rank()} stopped because {first}") from e
        raise
    finally:
        teardown()


def record(fn: Callable) -> Callable:
    """Decorate the entry point: torchrun's error file for this rank, and the failure announced to peers."""

    @functools.wraps(fn)
    def announcing(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            _announce_failure(e)
            raise

    return elastic_errors.record(announcing)


def _active() -> bool:
    """Whether a process group exists: then every collective goes through it, even at world size 1."""
    return dist.is_available() and dist.is_initialized()


def several_ranks() -> bool:
    """Whether this process works with other ranks (a process group of more than one process)."""
    return _active() and dist.get_world_size() > 1


def _store():
    """The rendezvous key-value store, which outlives any one worker under torchrun; None without a group."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    try:
        return dist.distributed_c10d._get_default_store()
    except (AttributeError, RuntimeError, ValueError):
        return None


def _agent_store():
    """torchrun's agent store, reachable before this worker joins a process group; None elsewhere."""
    launch = _launch_env(os.environ)
    if launch is None or launch[1] == 1 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None  # srun alone: rank 0 would host the store, and may be gone already
    try:
        return _job_store(launch[0], launch[1], datetime.timedelta(seconds=AGENT_STORE_TIMEOUT_S))
    except Exception:
        log.debug("torchrun's agent store is unreachable", exc_info=True)
        return None


def _failure_note(rank: int, error: BaseException) -> str:
    return f"rank {rank} failed: {type(error).__name__}: {error}".splitlines()[0][:2000]


def _announce_failure(error: BaseException, store=None) -> str | None:
    """Post "rank r failed: error" once per job (the first failure wins), unless this rank only saw a peer fail.

    Returns the note that won (this rank's or an earlier one), or None when nothing was posted.
    """
    store = store or _store()
    if store is None or isinstance(error, (PeerFailureError, KeyboardInterrupt, SystemExit)):
        return None
    rank = dist.get_rank() if dist.is_initialized() else _launch_env(os.environ)[0]
    try:
        return store.compare_set(FAILURE_KEY, "", _failure_note(rank, error)).decode()
    except Exception:  # the store may be gone already; the failure itself is still raised
        log.debug("could not announce the failure to the other ranks", exc_info=True)
        return None


def first_to_report(error: BaseException) -> bool:
    """Announce ``error`` to the other ranks; whether this rank should show it to the user.

    A bad config or a missing folder fails every rank alike: the first rank to announce the error
    shows it and the others, holding the same message, stay quiet. A rank whose error differs
    from the first one shows its own. Before the process group exists the note goes through
    torchrun's agent store; where no store can be reached, every rank shows its error.
    """
    store = _store() or _agent_store()
    first = _announce_failure(error, store) if store is not None else None
    if first is None:
        return True
    rank = dist.get_rank() if dist.is_initialized() else _launch_env(os.environ)[0]
    mine = _failure_note(rank, error)
    return first == mine or first.partition(" failed: ")[2] != mine.partition(" failed: ")[2]


def _peer_failure() -> str | None:
    """The note of the rank that failed first, waiting briefly for it to arrive."""
    store = _store()
    deadline = time.monotonic() + PEER_FAILURE_WAIT_S
    while store is not None:
        try:
            if store.check([FAILURE_KEY]):
                return store.get(FAILURE_KEY).decode()
        except Exception:
            return None
        if time.monotonic() > deadline:
            return None
        time.sleep(0.1)
    return None


@contextmanager
def _collective(what: str) -> Iterator[None]:
    """Turn a collective broken by a dead peer into an error that names the peer and its error."""
    try:
        yield
    except (RuntimeError, ConnectionError) as e:
        from rdprune import stop

        if stop.requested() is not None:
            # A signal reached every rank; a peer stopped at its own safe point (a curve piece) while this
            # rank waited here: this rank stops too, with the same one line rather than a broken collective.
            raise stop.Stopped(stop.requested(), f"{what}: a peer rank stopped first") from e
        note = _peer_failure()
        if note is None:
            raise
        raise PeerFailureError(f"{what} on rank {dist.get_rank()} stopped because {note}") from e


def barrier() -> None:
    """Wait until every rank arrives."""
    if _active():
        with _collective("barrier"):
            dist.barrier()


def broadcast_object(obj: object, src: int = 0) -> object:
    """``obj`` of rank ``src``, returned on every rank (any picklable object)."""
    if not _active():
        return obj
    box = [obj if dist.get_rank() == src else None]
    with _collective("broadcast"):
        dist.broadcast_object_list(box, src=src)
    return box[0]


def broadcast_tensors_(tensors: list[torch.Tensor], src: int = 0) -> None:
    """Overwrite ``tensors`` in place with rank ``src``'s values (e.g. BatchNorm statistics)."""
    if not _active():
        return
    with _collective("broadcast"):
        for t in tensors:
            dist.broadcast(t.data, src=src)


def gather_objects(obj: object, dst: int = 0) -> list | None:
    """Every rank's ``obj`` in rank order on rank ``dst``; None on the others."""
    if not _active():
        return [obj]
    out = [None] * dist.get_world_size() if dist.get_rank() == dst else None
    with _collective("gather"):
        dist.gather_object(obj, out, dst=dst)
    return out


def _all_gather_objects(obj: object) -> list:
    if not _active():
        return [obj]
    out = [None] * dist.get_world_size()
    with _collective("all-gather"):
        dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum of ``values`` over ranks (a new tensor on the caller's device; the input is untouched)."""
    if not _active():
        return values.clone()
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    total = values.detach().to(device, copy=True)
    with _collective("all-reduce"):
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total.to(values.device)


def fingerprint(obj: object) -> str:
    """SHA-256 of the content of tensors, arrays, mappings, sequences and plain values.

    Content only (dtype, shape, bytes; mapping keys sorted), so two processes holding equal
    data agree whatever their memory layout or dict insertion order.
    """
    h = hashlib.sha256()

    def feed(x: object) -> None:
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous().reshape(-1)
            h.update(f"T{x.dtype}{tuple(x.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(x, np.ndarray):
            a = np.ascontiguousarray(x)
            h.update(f"A{a.dtype}{a.shape}".encode())
            h.update(a.tobytes())
        elif isinstance(x, Mapping):
            h.update(f"M{len(x)}".encode())
            for k in sorted(x, key=repr):
                feed(k)
                feed(x[k])
        elif isinstance(x, (list, tuple)):
            h.update(f"L{len(x)}".encode())
            for v in x:
                feed(v)
        elif isinstance(x, (str, bytes, int, float, bool, type(None))):
            h.update(f"V{type(x).__name__}:{x!r}".encode())
        else:
            raise TypeError(f"cannot fingerprint a {type(x).__name__}; pass tensors, arrays, dicts, lists or plain values")

    feed(obj)
    return h.hexdigest()


def _describe_groups(hashes: list[str]) -> str:
    """'ranks 0,2 abc123456789, rank 1 def456789012': ranks grouped by the hash they hold."""
    groups: dict[str, list[int]] = {}
    for r, h in enumerate(hashes):
        groups.setdefault(h, []).append(r)
    parts = []
    for h, ranks in groups.items():
        label = "rank" if len(ranks) == 1 else "ranks"
        parts.append(f"{label} {','.join(map(str, ranks))} {h[:12]}")
    return ", ".join(parts)


def check_identical(obj: object, what: str) -> None:
    """Raise :class:`RankMismatchError` on every rank unless all ranks hold equal ``obj``."""
    hashes = _all_gather_objects(fingerprint(obj))
    if len(set(hashes)) > 1:
        differ = [r for r, h in enumerate(hashes) if h != hashes[0]]
        raise RankMismatchError(f"ranks disagree on {what}: ranks {differ} differ from rank 0 "
                                f"({_describe_groups(hashes)})")


def check_same_config(config_hash: str) -> None:
    """Raise :class:`UserError` on every rank unless all ranks resolved the same config."""
    hashes = _all_gather_objects(config_hash)
    if len(set(hashes)) > 1:
        raise UserError(f"ranks disagree on the resolved config: {_describe_groups(hashes)}; "
                        "launch every node with the same config and overrides")


def wrap_ddp(model: nn.Module, info: DistInfo) -> nn.Module:
    """``model`` on this rank's device, inside DistributedDataParallel whenever there is a process group
    (several ranks, or one forced to have a group)."""
    model = model.to(info.device)
    if info.backend is None:
        return model
    log.info("training in DistributedDataParallel: %d rank%s, backend %s, device %s", info.world_size,
             "" if info.world_size == 1 else "s", info.backend, info.device)
    device_ids = [info.device.index] if info.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


class _RankFilter(logging.Filter):
    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank_prefix = f"[rank {self.rank}] " if self.rank else ""
        return True


def setup_logging(rank: int) -> None:
    """rdprune's log to stderr: INFO from rank 0, WARNING and above from the others, tagged by rank.

    Idempotent: calling it again replaces the handler it installed.
    """
    logger = logging.getLogger("rdprune")
    for h in [h for h in logger.handlers if getattr(h, "_rdprune_rank_handler", False)]:
        logger.removeHandler(h)
    handler = logging.StreamHandler()
    handler._rdprune_rank_handler = True  # type: ignore[attr-defined]
    handler.addFilter(_RankFilter(rank))
    handler.setFormatter(logging.Formatter("%(rank_prefix)s%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    logger.propagate = False
