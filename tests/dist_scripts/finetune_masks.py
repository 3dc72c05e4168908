"""Under torchrun: the pipeline's fine-tuning path (engine chosen by the config) on a masked model.

Every rank checks that pruned weights are still exactly zero and that surviving weights trained,
then all ranks compare a fingerprint of the whole state (weights and buffers).
Usage: finetune_masks.py CONFIG [section.key=value ...]
"""
import sys

import torch

from rdprune import distributed as d
from rdprune.config import load_config
from rdprune.core.masks import apply_masks
from rdprune.pipeline import loop as pipeline
from rdprune.pipeline.run_dir import RunLayout


@d.record
def main() -> None:
    cfg = load_config(sys.argv[1], sys.argv[2:])
    torch.set_num_threads(1)
    single_group = cfg.distributed.engine == "deepspeed"
    with d.distributed_session("cpu", timeout_s=300, single_group=single_group) as info:
        ctx = pipeline._build(cfg, info, RunLayout(cfg.out_path))
        masks = apply_masks(ctx.model, {n: 0.6 for n in ctx.layers}, ctx.layers)
        before = {n: m.weight.detach().clone() for n, m in ctx.layers.items()}
        pipeline._train(ctx, cfg.finetune, cfg.finetune.steps, seed=7, desc="finetune", masks=masks)
        for name, module in ctx.layers.items():
            weight = module.weight.detach()
            assert (weight[~masks[name]] == 0).all(), f"rank {info.rank}: pruned weights of {name} revived"
            assert not torch.equal(weight[masks[name]], before[name][masks[name]]), f"{name} did not train"
        d.check_identical(ctx.model.state_dict(), "the model state after fine-tuning")
        print(f"{cfg.distributed.engine} fine-tuning ok on rank {info.rank}", flush=True)


if __name__ == "__main__":
    main()
