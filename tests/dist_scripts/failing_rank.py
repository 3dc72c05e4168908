"""Under torchrun: rank ``argv[1]`` raises while the others wait in a collective (which must not hang)."""
import sys
import time

from rdprune import distributed as d


@d.record
def main() -> None:
    with d.distributed_session("cpu", timeout_s=300) as info:
        if info.rank == int(sys.argv[1]):
            time.sleep(1)
            raise RuntimeError(f"deliberate failure on rank {info.rank}")
        d.barrier()


if __name__ == "__main__":
    main()
