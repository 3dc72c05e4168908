"""Devices a run may name (``run.device``), declared without importing torch for the config schema."""
from rdprune.registry import DEVICES

for _name in ("auto", "cpu", "cuda"):  # auto = cuda when available, else cpu
    DEVICES.register(_name, None)
