"""Model-name prefixes of other libraries (``timm:``, ``hf:``), declared without importing torch.

Names that start with one of them are built by :mod:`rdprune.models.hub` and never read as an
import path ``package.module:callable``.
"""
from rdprune.registry import MODEL_PREFIXES

TIMM_PREFIX = "timm:"
HF_PREFIX = "hf:"
MODEL_PREFIXES.register(TIMM_PREFIX, "timm")
MODEL_PREFIXES.register(HF_PREFIX, "transformers")
