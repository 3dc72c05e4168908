"""``python -m rdprune.compare CONFIG [section.key=value | sweep.key=value ...]``: compare pruning methods.

Runs every method, variant and seed of the config's ``sweep:`` section from one pretrained
checkpoint (see :mod:`rdprune.sweep.plan`), then writes comparison.md, comparison.csv and comparison.png
into the output directory and prints the table. Rerunning the command resumes the sweep. The same
command runs under ``torchrun``: every rank runs the same sequence of runs, rank 0 writes the tables.
The sweep is loaded and every run's config checked before torch is imported.
"""
from __future__ import annotations

import argparse
import sys

from rdprune.cli.common import build_run_parser
from rdprune.sweep.plan import load_sweep

PROG = "python -m rdprune.compare"
SWEEP_HELP = """
the config's sweep section (override its keys as sweep.key=value, e.g. sweep.seeds=[0]):
  methods: [rd, lamp, ...]              one run per method (prune.method set to it)
  variants: {name: {section.key: value}}  named override sets, e.g. rd_oneshot: {prune.amount_per_iteration: 1.0}
  seeds: [0, 1, 2]                      fine-tuning data order and calibration sampling; never the checkpoint
  targets: [0.5, 0.7, 0.9]              optional: one run per target sparsity (e.g. one shot to each)
  pretrain_per_seed: true               optional: each seed pretrains its own checkpoint (default false)
  peers: [tp_l2_global, ...]            optional: entries every other entry is compared with, seed by seed
"""


def build_parser() -> argparse.ArgumentParser:
    """The run parser, described for the sweep."""
    parser = build_run_parser(PROG)
    parser.description = ("Compare pruning methods: run every method, variant and seed of the config's sweep "
                          "section from one pretrained checkpoint, then write comparison.md, .csv and .png.")
    parser.epilog = SWEEP_HELP + "\n" + parser.epilog
    return parser


def main(argv: list[str]) -> int:
    """Validate the whole sweep first, then run it, leaving the process group on every exit."""
    ns = build_parser().parse_args(argv)
    path, overrides = ns.config, list(ns.overrides)
    plan = load_sweep(path, overrides)  # no torch yet: a bad sweep is refused within a second
    import torch

    from rdprune import distributed
    from rdprune.cli.common import check_gpu_decoding, deterministic_on_cpu
    from rdprune.distributed.collectives import check_precision
    from rdprune.granularity.base import stage_class
    from rdprune.sweep.plan import check_plan, plan_hash, run_sweep
    from rdprune.sweep.tables import write_comparison

    base = plan.base
    if base.run.threads:
        torch.set_num_threads(base.run.threads)
    title = f"{base.model.name} / {base.data.name}: top-1 against sparsity"
    check_gpu_decoding(base)
    # DeepSpeed needs a process group even alone; force_process_group asks for one (DDP, NCCL at world size 1)
    single_group = base.distributed.engine == "deepspeed" or base.distributed.force_process_group
    with distributed.distributed_session(base.run.device, base.distributed.timeout_s, single_group=single_group) as dist:
        distributed.setup_logging(dist.rank)
        deterministic_on_cpu(dist.device)
        check_precision(base.distributed.precision, dist.device)
        for planned in plan.runs:  # what a variant's granularity needs of the machine, before the shared pretraining
            stage_class(planned.cfg).precheck(planned.cfg, dist)
        distributed.check_same_config(plan_hash(plan))
        check_plan(plan, dist)
        results = run_sweep(plan, dist, on_progress=lambda r: write_comparison(plan.out, r, plan.seeds, title, plan.peers))
        if dist.is_main:
            table = write_comparison(plan.out, results, plan.seeds, title, plan.peers)
            sys.stdout.write(table + "\n")
            sys.stdout.write(f"comparison.md, comparison.csv and comparison.png in {plan.out}\n")
    return 0

