"""The pruning core: single-process, no ``torch.distributed``; everything else composes it."""
