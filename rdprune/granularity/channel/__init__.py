"""Channel granularity: each group of coupled channels one unit, a physically smaller model exported at the end."""
from rdprune.granularity.spec import GranularitySpec
from rdprune.registry import GRANULARITIES

SPEC = GRANULARITIES.register("channel", GranularitySpec(
    name="channel",
    unit="channel group",
    form="channel",
    # rd, the baselines of .baselines, then Torch-Pruning's own pruners (.peers)
    methods=("rd", "unif", "glob", "tp_l2", "tp_l2_global", "tp_taylor_global", "tp_bn_scale_global", "tp_lamp_global"),
    budgets=("weights", "flops", "latency"),
    plugin="rdprune.granularity.channel.stage:ChannelStage",
    reads_latency=True,
    bn_aware_curves=True,
    bn_aware_default=True,  # chosen by configs/compare_channel_peers.yaml: docs/compare_channel_peers.md
    bn_aware_one_batch=True,
    rankings=("l2", "taylor", "bn_scale", "activation"),  # .ranking
    default_ranking="activation",  # chosen by configs/compare_channel_peers.yaml: docs/compare_channel_peers.md
    labelled_rankings=("taylor",),
    round_to=True,
    curve_rounds=True,
    latency_runtimes=("torch", "onnxruntime"),  # rdprune.core.runtimes
))
