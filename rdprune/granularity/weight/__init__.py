"""Weight granularity: unstructured masks, each prunable layer one unit (the published method)."""
from rdprune.granularity.spec import GranularitySpec
from rdprune.registry import GRANULARITIES

SPEC = GRANULARITIES.register("weight", GranularitySpec(
    name="weight",
    unit="layer",
    form="weight",
    methods=("rd", "lamp", "glob", "unif", "unifplus", "erk"),  # rd, then the baselines of .baselines
    budgets=("weights", "flops"),
    plugin="rdprune.granularity.weight.stage:WeightStage",
    bn_aware_curves=True,
    budget_refusals={"latency": "unstructured masks run no faster"},
))
