"""``python -m rdprune.run CONFIG [section.key=value ...]``: prune and fine-tune as the config says (:mod:`rdprune.cli.run`)."""
from rdprune.cli.common import run_cli
from rdprune.cli.run import main

if __name__ == "__main__":
    run_cli(main)
