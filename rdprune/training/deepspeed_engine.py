"""Fine-tuning under DeepSpeed (ZeRO stage 0, 1 or 2; fp32 or bf16) with pruned weights held at zero.

Under ZeRO-1/2, and under bf16, DeepSpeed keeps an fp32 master copy of each weight in the
optimizer, split across ranks, and copies it back into the module after every step. Zeroing the
module's weights alone would be undone by the next step, so after every step the masks are applied
both to the module's weights and to this rank's fragment of the master copy; pruned weights'
gradients are masked too, so optimizer state never builds up for them.
"""
from __future__ import annotations

import gc
import json
import logging
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from rdprune import distributed, registry
from rdprune.core.masks import MaskGuard, Masks, enforce_masks
from rdprune.distributed import DistInfo
from rdprune.errors import UserError
from rdprune.files import full_disk, write_error, write_json
from rdprune.training import checkpoint
from rdprune.training.rng import rng_state, set_rng_state

log = logging.getLogger(__name__)



def _import_deepspeed():
    try:
        import deepspeed
    except ImportError as e:
        raise UserError("distributed.engine is 'deepspeed' but DeepSpeed is not installed; "
                        "install it with DS_BUILD_OPS=0 pip install 'rdprune[deepspeed]', or use engine 'ddp'") from e
    return deepspeed


DEFAULT_BUCKET = 500_000_000
"""DeepSpeed's default ZeRO bucket, in elements: sized for GPU memory pools."""


def deepspeed_config(zero_stage: int, precision: str, global_batch: int, world_size: int, parameters: int) -> dict:
    """DeepSpeed's config dict for rdprune's settings: no gradient clipping, one micro-batch per step.

    ZeRO's reduce and all-gather buckets hold at most the model's ``parameters`` (rounded up to 4,096):
    DeepSpeed allocates its default 5e8-element bucket afresh at every step, which on a CPU made a
    small model's ZeRO step ~50x slower than DDP's (mostly in the kernel, mapping 2 GB twice a step).
    """
    if zero_stage not in registry.ZERO_STAGES:
        raise UserError(f"distributed.zero_stage must be one of {', '.join(map(str, registry.ZERO_STAGES.names()))} "
                        f"(stage 3 shards weights, which pruning needs whole), got {zero_stage!r}")
    if precision not in registry.PRECISIONS:
        raise UserError(f"distributed.precision must be one of {', '.join(registry.PRECISIONS.names())}, got {precision!r}")
    if global_batch < world_size or global_batch % world_size:
        raise UserError(f"the batch size {global_batch} must be a multiple of the number of ranks {world_size} "
                        "(each rank takes an equal share of every step)")
    bucket = min(DEFAULT_BUCKET, -(-max(parameters, 1) // 4096) * 4096)  # DeepSpeed wants aligned bucket sizes
    return {
        "train_batch_size": global_batch,
        "train_micro_batch_size_per_gpu": global_batch // world_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,
        "zero_optimization": {"stage": zero_stage, "reduce_bucket_size": bucket, "allgather_bucket_size": bucket},
        "bf16": {"enabled": precision == "bf16"},
        # rdprune's own SGD/Adam/AdamW: DeepSpeed has not certified them under ZeRO, but they work.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def _mask_master_fragment(param: nn.Parameter, mask: torch.Tensor) -> None:
    """Zero the masked entries of this rank's fragment of ``param``'s fp32 master copy, if it has one."""
    mapping = getattr(param, "_hp_mapping", None)
    if mapping is None:
        return
    address = mapping.lp_fragment_address
    keep = mask.flatten().narrow(0, address.start, address.numel)
    fragment = mapping.get_hp_fragment()
    fragment.mul_(keep.to(fragment.device, fragment.dtype))


class DeepSpeedEngine:
    """A model and optimizer inside ``deepspeed.initialize``; one call of :meth:`train_step` per batch.

    ``layers`` and ``masks`` (optional) name the prunable layers of ``model`` and the weights that
    must stay zero. Every rank constructs it, steps it and saves it together.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        info: DistInfo,
        *,
        zero_stage: int,
        precision: str,
        global_batch: int,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        layers: Mapping[str, nn.Module] | None = None,
        masks: Masks | None = None,
        label_smoothing: float = 0.0,
    ):
        config = deepspeed_config(zero_stage, precision, global_batch, info.world_size,
                                  sum(p.numel() for p in model.parameters()))
        deepspeed = _import_deepspeed()
        if precision == "bf16":
            from deepspeed.accelerator import get_accelerator

            if not get_accelerator().is_bf16_supported():
                raise UserError(f"distributed.precision 'bf16' is not supported on {info.device}; use 'fp32'")
            if info.device.type == "cpu" and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
                raise UserError("distributed.precision 'bf16' with BatchNorm layers needs a GPU (DeepSpeed's bf16 "
                                "batch norm has no CPU kernel); use 'fp32' on CPU")
        if (masks is None) != (layers is None):
            raise ValueError("pass layers and masks together, or neither")
        self.info = info
        self.dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        self.layers = dict(layers or {})
        self.masks = {n: m.to(info.device) for n, m in (masks or {}).items()}
        # Masks first, so the master copy DeepSpeed takes now starts with the zeros.
        self._guard = MaskGuard(self.layers, self.masks) if self.masks else None
        if info.is_main:
            logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        self.engine, *_ = deepspeed.initialize(
            model=model.to(info.device), optimizer=optimizer, lr_scheduler=scheduler, config=config,
            dist_init_required=False,
        )

    @property
    def module(self) -> nn.Module:
        """The unwrapped model (its weights are the ones DeepSpeed trains)."""
        return self.engine.module

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """One optimizer step on this rank's micro-batch; the loss of that micro-batch."""
        self.engine.train()
        x = x.to(self.info.device, self.dtype if x.is_floating_point() else x.dtype)
        loss = self.criterion(self.engine(x).float(), y.to(self.info.device))
        if not torch.isfinite(loss):
            raise ValueError(f"training loss became {loss.item()}; lower the learning rate")
        self.engine.backward(loss)
        self.engine.step()
        self._enforce()
        # DeepSpeed leaves buffers alone: rank 0's BatchNorm statistics win, as under DDP.
        distributed.broadcast_tensors_(list(self.engine.module.buffers()))
        return float(loss.item())

    @torch.no_grad()
    def _enforce(self) -> None:
        enforce_masks(self.layers, self.masks)
        for name, mask in self.masks.items():
            _mask_master_fragment(self.layers[name].weight, mask)

    def save(self, directory: Path, iteration: int, step: int) -> None:
        """DeepSpeed's sharded checkpoint (model, optimizer and master copy, scheduler, every rank's random
        state) under ``directory/deepspeed``, then rank 0's marker ``directory/finetune.json`` naming it.

        Every rank must call it: each writes its own shard of the optimizer state.
        """
        tag = checkpoint.deepspeed_tag(iteration, step)
        rngs = distributed.gather_objects(rng_state(self.info.device))
        # DeepSpeed writes the client state with the model, from rank 0: rank 0's list is the one kept.
        target = directory / checkpoint.DEEPSPEED_DIR / tag
        try:
            self.engine.save_checkpoint(str(directory / checkpoint.DEEPSPEED_DIR), tag=tag,
                                        client_state={"rng": rngs}, save_latest=False)
        except (RuntimeError, OSError) as err:  # torch's C++ writer reports a full disk as a RuntimeError
            cause = err if isinstance(err, OSError) else full_disk(directory / checkpoint.DEEPSPEED_DIR)
            user = write_error(target, cause) if cause is not None else None
            if user is None:
                raise
            raise user from err
        distributed.barrier()
        if self.info.is_main:
            write_json(directory / checkpoint.DEEPSPEED_MARKER, {
                "engine": "deepspeed", "world_size": self.info.world_size, "iteration": iteration, "step": step, "tag": tag})
            for old in (directory / checkpoint.DEEPSPEED_DIR).iterdir():
                if old.is_dir() and old.name != tag:  # earlier saves: the marker no longer names them
                    shutil.rmtree(old, ignore_errors=True)
        distributed.barrier()

    def load(self, directory: Path) -> int:
        """Restore :meth:`save`'s checkpoint on every rank; the step it was saved after."""
        marker = json.loads((directory / checkpoint.DEEPSPEED_MARKER).read_text())
        path, client = self.engine.load_checkpoint(str(directory / checkpoint.DEEPSPEED_DIR), tag=marker["tag"])
        if path is None:
            raise UserError(f"{directory / checkpoint.DEEPSPEED_MARKER} names DeepSpeed checkpoint "
                            f"{marker['tag']!r}, which cannot be read; delete both to restart this iteration's fine-tuning")
        set_rng_state(client["rng"][self.info.rank], self.info.device)
        self._enforce()
        return marker["step"]

    def close(self) -> None:
        """Hand the module back in fp32, remove the gradient hooks, and release DeepSpeed's engine.

        Under bf16 the module holds bf16 copies; evaluation, curves and checkpoints expect fp32,
        so the fp32 master weights (gathered from the ZeRO partitions on every rank) go back in.
        """
        if self.dtype != torch.float32:
            from deepspeed.utils import safe_get_full_fp32_param

            module = self.engine.module
            masters = [safe_get_full_fp32_param(p) for p in module.parameters()]
            module.float()
            with torch.no_grad():
                for param, master in zip(module.parameters(), masters):
                    if master is not None:
                        param.copy_(master.view_as(param))
            self._enforce()
        if self._guard is not None:
            self._guard.remove()
        # Released now, while the process group is up: left to interpreter exit, workers sometimes
        # aborted after finishing ("terminate called without an active exception", about 1 run in 8).
        self.engine.destroy()
        self.engine = None
        gc.collect()
