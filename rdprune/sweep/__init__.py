"""Comparison sweeps: the plan of runs (:mod:`.plan`) and the tables and plot of their results (:mod:`.tables`)."""
