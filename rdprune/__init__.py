"""rdprune: layer-adaptive weight pruning by rate-distortion optimisation."""
__version__ = "0.1.0"
