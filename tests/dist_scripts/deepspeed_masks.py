"""Under torchrun: DeepSpeed train steps on a masked CNN keep zeros zero (module and master) and ranks equal.

Usage: deepspeed_masks.py ZERO_STAGE PRECISION CHECKPOINT_DIR
"""
import sys
from pathlib import Path

import torch
from deepspeed.utils import safe_get_full_fp32_param

from rdprune import distributed as d
from rdprune.core.layers import prunable_layers
from rdprune.core.masks import apply_masks
from rdprune.training.deepspeed_engine import DeepSpeedEngine

from tiny_models import Branchy


def check(engine: DeepSpeedEngine, masks: dict, what: str) -> None:
    for name, mask in masks.items():
        weight = engine.layers[name].weight
        assert (weight[~mask] == 0).all(), f"{what}: module weight of {name} revived"
        master = safe_get_full_fp32_param(weight)  # a collective: every rank calls it
        if master is not None:
            assert (master[~mask] == 0).all(), f"{what}: master copy of {name} revived"
        assert (weight[mask] != 0).any(), f"{what}: {name} has no surviving weight"
    d.check_identical({k: v.float() for k, v in engine.module.state_dict().items()}, f"weights {what}")


@d.record
def main() -> None:
    stage, precision, ckpt = int(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    torch.set_num_threads(1)
    with d.distributed_session("cpu", timeout_s=300) as info:
        torch.manual_seed(0)
        model = Branchy()
        layers = prunable_layers(model)
        masks = apply_masks(model, {n: 0.5 for n in layers}, layers)
        before = {n: layers[n].weight.detach().clone() for n in layers}
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
        engine = DeepSpeedEngine(model, optimizer, info, zero_stage=stage, precision=precision, global_batch=8,
                                 layers=layers, masks=masks)
        generator = torch.Generator().manual_seed(100 + info.rank)  # each rank its own data
        for _ in range(3):
            loss = engine.train_step(torch.randn(4, 3, 8, 8, generator=generator), torch.randint(0, 5, (4,), generator=generator))
            assert loss == loss
        assert any(not torch.equal(before[n], layers[n].weight.detach().float()) for n in layers), "nothing trained"
        check(engine, masks, "after training")
        engine.save(ckpt, 1, 3)
        trained = {k: v.clone() for k, v in engine.module.state_dict().items()}
        engine.train_step(torch.randn(4, 3, 8, 8, generator=generator), torch.randint(0, 5, (4,), generator=generator))
        assert engine.load(ckpt) == 3
        assert all(torch.equal(trained[k], v) for k, v in engine.module.state_dict().items()), "load did not restore"
        check(engine, masks, "after loading")
        engine.close()
        print(f"deepspeed zero {stage} {precision} ok on rank {info.rank}", flush=True)


if __name__ == "__main__":
    main()
