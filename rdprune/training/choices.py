"""The training vocabulary a config may choose: optimisers, schedules, engines, precisions, ZeRO stages.

Declared here, without importing torch, so that the config schema validates against them at once;
:mod:`rdprune.training.optim` and the engines implement exactly these names.
"""
from rdprune.registry import ENGINES, OPTIMIZERS, PRECISIONS, SCHEDULERS, ZERO_STAGES

for _name in ("sgd", "adam", "adamw"):
    OPTIMIZERS.register(_name, None)
for _name in ("cosine", "step", "constant"):
    SCHEDULERS.register(_name, None)
for _name in ("ddp", "deepspeed"):  # ddp: LocalEngine (plain in one process); deepspeed: ZeRO
    ENGINES.register(_name, None)
for _name in ("fp32", "bf16"):
    PRECISIONS.register(_name, None)
for _stage in (0, 1, 2):
    ZERO_STAGES.register(_stage, None)  # type: ignore[arg-type]
