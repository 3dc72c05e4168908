"""Under torchrun: the last rank resolves a different config; every rank must exit 2 with the message.

Mimics the CLI's handling of UserError (one line on stderr, exit code 2).
"""
import hashlib
import sys

from rdprune import distributed as d
from rdprune.errors import UserError


@d.record
def main() -> int:
    info = d.init_distributed("cpu", timeout_s=60)
    try:
        config = "lr: 0.1" if info.rank < info.world_size - 1 else "lr: 0.2"
        d.check_same_config(hashlib.sha256(config.encode()).hexdigest())
        return 0
    except UserError as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    finally:
        d.teardown()


if __name__ == "__main__":
    sys.exit(main())
