"""Under torchrun: every collective of rdprune.distributed gives the expected answer on every rank."""
import sys

import torch

from rdprune import distributed as d
from rdprune.errors import UserError


@d.record
def main() -> None:
    info = d.init_distributed("cpu", timeout_s=60)
    try:
        r, w = info.rank, info.world_size
        assert info.backend == "gloo" and w == int(sys.argv[1]), info
        assert d.broadcast_object({"from": r}, src=w - 1) == {"from": w - 1}
        gathered = d.gather_objects(("rank", r), dst=0)
        assert gathered == ([("rank", i) for i in range(w)] if r == 0 else None), gathered
        total = d.all_reduce_sum(torch.tensor([1.0, float(r)]))
        assert total.tolist() == [float(w), float(sum(range(w)))], total
        # Equal content in a different insertion order is identical.
        d.check_identical({"b": torch.arange(3), "a": [1.5, "x"]} if r % 2 else {"a": [1.5, "x"], "b": torch.arange(3)}, "a dict")
        d.check_same_config("abc")
        try:
            d.check_identical(torch.tensor([0.0, 1.0 if r == w - 1 else 0.0]), "the masks")
        except d.RankMismatchError as e:
            assert f"ranks [{w - 1}] differ from rank 0" in str(e) and "the masks" in str(e), str(e)
        else:
            raise AssertionError("a mismatch across ranks went undetected")
        try:
            d.check_same_config("same" if r == 0 else "other")
        except UserError as e:
            assert "ranks disagree on the resolved config" in str(e), str(e)
        else:
            raise AssertionError("a config mismatch went undetected")
        d.barrier()
        print(f"collectives ok on rank {r}", flush=True)
    finally:
        d.teardown()
        d.teardown()


if __name__ == "__main__":
    main()
