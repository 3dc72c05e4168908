"""2:4 granularity: each Linear layer the GPU's 2:4 kernels accept one unit, dense or 2:4.

The config value is ``semi_structured`` (PyTorch's name for the pattern); in code it is "two_four".
"""
from rdprune.granularity.spec import GranularitySpec, RowColumn
from rdprune.registry import GRANULARITIES

SPEC = GRANULARITIES.register("semi_structured", GranularitySpec(
    name="semi_structured",
    unit="2:4 layer",
    form="2:4",
    methods=("rd", "glob"),
    budgets=("weights", "layers", "latency"),
    plugin="rdprune.granularity.two_four.stage:TwoFourStage",
    reads_latency=True,
    max_min_density=0.5,
    min_density_reason="a 2:4 layer keeps half of its weights",
    budget_words={"layers": "candidate layers made 2:4"},
    columns=(RowColumn("layers_2to4", "2:4 layers", lambda r: f"{r['layers_2to4']:>3} of {r['candidates']:>3}"),),
))
