"""``python -m rdprune.compare CONFIG [overrides]``: compare pruning methods (:mod:`rdprune.cli.compare`)."""
from rdprune.cli.common import run_cli
from rdprune.cli.compare import main

if __name__ == "__main__":
    run_cli(main)
