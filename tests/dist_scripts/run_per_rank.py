"""``python -m rdprune.run`` with ``{rank}`` in any argument replaced by this worker's rank.

Mimics nodes launched with different overrides: ``run_per_rank.py CONFIG finetune.lr=0.0{rank}5``.
"""
import os
import sys

from rdprune.cli.common import run_cli
from rdprune.run import main

if __name__ == "__main__":
    run_cli(main, [a.replace("{rank}", os.environ["RANK"]) for a in sys.argv[1:]])
