"""``python -m rdprune.run CONFIG [section.key=value ...]``: prune and fine-tune as the config says.

The same command runs under ``torchrun``; a single process is a world of size 1. The config is
loaded and checked before torch is imported, so a bad file, key, type or value fails at once.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from rdprune.cli.common import parse_run_args
from rdprune.config import config_hash, load_config
from rdprune.pipeline.run_dir import RunLayout


def main(argv: list[str]) -> int:
    """Validate everything first, then build, run, and always leave the process group."""
    path, overrides = parse_run_args(argv)
    cfg = load_config(path, overrides)  # no torch yet: a bad config is refused within a second
    import torch

    from rdprune import distributed
    from rdprune.cli.common import check_gpu_decoding, deterministic_on_cpu
    from rdprune.distributed.collectives import check_precision
    from rdprune.pipeline.loop import run
    from rdprune.pipeline.report import results_table

    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    check_gpu_decoding(cfg)
    # DeepSpeed needs a process group even alone; force_process_group asks for one (DDP, NCCL at world size 1)
    single_group = cfg.distributed.engine == "deepspeed" or cfg.distributed.force_process_group
    with distributed.distributed_session(cfg.run.device, cfg.distributed.timeout_s, single_group=single_group) as dist:
        distributed.setup_logging(dist.rank)
        deterministic_on_cpu(dist.device)
        check_precision(cfg.distributed.precision, dist.device)
        distributed.check_same_config(config_hash(cfg))
        rows = run(cfg, dist)
        if dist.is_main:
            sys.stdout.write(results_table(rows) + "\n")
            sys.stdout.write(f"results, final model and plots in {cfg.out_path}\n")
            sys.stdout.write(final_model_lines(cfg.out_path))
    return 0


def final_model_lines(out: Path) -> str:
    """Where the final model is and the Python line that loads it (and the physically smaller one, where the run exported it)."""
    layout = RunLayout(out)
    literal = json.dumps(str(out), ensure_ascii=False)  # a valid Python string literal, also for odd paths
    lines = f"final model: {layout.final_model} (load it with rdprune.load_model({literal}))\n"
    smaller = layout.smaller_model
    if smaller.is_file():
        lines += f"physically smaller model: {smaller} (load it with rdprune.load_model({literal}, smaller=True))\n"
        try:
            speed = json.loads((smaller.parent / "latency.json").read_text())
            lines += (f"measured speed-up of {speed['timed']}: {speed['speedup']:.2f}x ({speed['dense_ms']:.2f} ms -> "
                      f"{speed['pruned_ms']:.2f} ms per batch of {speed['batch']} on {speed['device']}, "
                      f"{speed['parameters_dense']:,} -> {speed['parameters_pruned']:,} parameters)\n")
            if "deploy" in speed:
                lines += (f"for deployment: {', '.join(speed['deploy']) or 'no exported format was faster than dense'}"
                          f"{'; slower than dense: ' + '; '.join(speed['slower']) if speed['slower'] else ''}\n")
        except (OSError, ValueError, KeyError, TypeError):
            pass  # an older run's latency.json, or none: the model is still there
    return lines
