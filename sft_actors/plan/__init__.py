"""Resource planner: per-device cut and codec (slow timescale) and bandwidth (fast timescale).

Pure numpy + scipy: no actors, no sockets, no model imports. Start at :func:`plan`; the models
are documented in ``costs`` (model and training), ``channel`` (wireless), ``compression``
(bytes) and ``accuracy``, ``model`` (delay and memory), ``slow`` and ``bandwidth`` (the two
timescales) and ``baselines``; ``from_topology`` adapts topology files and ``refit`` the data.
"""

from sft_actors.plan.accuracy import AccuracyCurve, AccuracyPoint, fit_accuracy_curve, load_accuracy_curve
from sft_actors.plan.bandwidth import Allocation, equal_bandwidth, minmax_bandwidth, slsqp_bandwidth
from sft_actors.plan.baselines import (
    equal_bandwidth_plan,
    exhaustive_plan,
    fixed_cut_plan,
    no_compression_plan,
)
from sft_actors.plan.channel import (
    ChannelConfig,
    ChannelState,
    DeviceProfile,
    ServerProfile,
    draw_channel,
    shannon_rate,
)
from sft_actors.plan.compression import (
    CodecRatio,
    CodecTable,
    CompressionMenu,
    CompressionOption,
    build_menu,
    load_codec_table,
)
from sft_actors.plan.costs import ModelCosts, TrainingShape
from sft_actors.plan.model import PlanProblem, Terms, build_terms, score
from sft_actors.plan.planner import DeviceChoice, PlanSolution, channel_for, plan, replan_bandwidth
from sft_actors.plan.scenarios import random_devices, random_problem

__all__ = [
    "AccuracyCurve",
    "AccuracyPoint",
    "Allocation",
    "ChannelConfig",
    "ChannelState",
    "CodecRatio",
    "CodecTable",
    "CompressionMenu",
    "CompressionOption",
    "DeviceChoice",
    "DeviceProfile",
    "ModelCosts",
    "PlanProblem",
    "PlanSolution",
    "ServerProfile",
    "Terms",
    "TrainingShape",
    "build_menu",
    "build_terms",
    "channel_for",
    "draw_channel",
    "equal_bandwidth",
    "equal_bandwidth_plan",
    "exhaustive_plan",
    "fit_accuracy_curve",
    "fixed_cut_plan",
    "load_accuracy_curve",
    "load_codec_table",
    "minmax_bandwidth",
    "no_compression_plan",
    "plan",
    "random_devices",
    "random_problem",
    "replan_bandwidth",
    "score",
    "shannon_rate",
    "slsqp_bandwidth",
]
