"""Granularities: what one unit of the allocation is (a layer, a group of coupled channels, a 2:4 layer).

Each granularity is one package here that declares a :class:`~rdprune.granularity.spec.GranularitySpec`
in :data:`rdprune.registry.GRANULARITIES` (light: names, budgets, config rules) and implements the
stage protocol of :mod:`rdprune.granularity.base` (heavy, imported when a run uses it). The pipeline,
sweeps, the CLI and the reports consume the protocol and never name a granularity.
"""
