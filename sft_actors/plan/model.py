"""The planning problem and its delay and memory models, vectorised over devices and plans.

Per round (one round = ``S = steps_per_round`` micro-batches per device, run one after the
other; ``tok = batch·seq`` tokens each; ``f = block_flops_per_token(seq)``; ``β`` =
backward_factor; ``L`` blocks; device ``n`` holds the embedding and blocks ``[0, c_n)``):

- device compute: ``S·tok·(f_embed + c·f + β·c·f) / F_n`` (forward, then backward of its blocks);
- server compute for device n: ``S·(1+β)·tok·((L−c)·f + f_head) / F_server``;
- uplink bits: ``S·X/ρ + c·Λ/E``; downlink bits: ``S·X/ρ_down + c·Λ/E``, with ``X`` the raw cut
  tensor (``tok·hidden·activation_bytes·8`` bits), ρ the codec ratio (ρ_down the gradient
  chain's ratio — ρ, or a rate-controlled chain's own target — when gradients are
  compressed, else 1; the relaxed slow timescale uses ρ_down = ρ, an upper bound on the
  down bits, and the integer rounding uses each option's own ρ_down), ``Λ`` the LoRA bits
  of one block (fp32) and ``E = aggregate_every`` (each device sends and receives its
  blocks' adapters every E rounds);
- device n's path: ``D_n = a_n + up_bits/r↑(B_n) + down_bits/r↓(B_n)`` with ``a_n`` the two
  compute terms above (seconds per round; rates from ``channel``);
- devices run in parallel and share the server, so the round takes
  ``T = max(max_n D_n, S·Σ_n server_n)``: the slowest path, or the server's total work when that
  is longer (the server cannot finish before it has served every device);
- total delay = ``rounds(Δ) · T`` where ``Δ = Σ_n w_n Δ(ρ_n)`` (data-weighted accuracy loss,
  ``compression``) and ``rounds(Δ) = rounds_base·(1 + rounds_per_loss·Δ)`` (``costs``).

Device memory (bytes): ``embed + 2·tok·hidden·act_bytes`` (the cut tensor and its gradient)
``+ overhead + c·(block weights + LoRA·(2 + optimizer states)·lora_bytes +
max_inflight·tok·saved_floats·act_bytes)`` must not exceed the device's ``memory_mb``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from sft_actors.errors import ConfigError, PlanInfeasible
from sft_actors.plan.bandwidth import Allocation, minmax_bandwidth
from sft_actors.plan.channel import ChannelConfig, ChannelState, DeviceProfile, ServerProfile
from sft_actors.plan.compression import CompressionMenu
from sft_actors.plan.costs import ModelCosts, TrainingShape

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
MB = 1e6


@dataclass(frozen=True, kw_only=True, slots=True)
class PlanProblem:
    """Everything the planner needs: model costs, training, devices, server, channel, codec menu."""

    model: ModelCosts
    training: TrainingShape
    devices: tuple[DeviceProfile, ...]
    server: ServerProfile
    channel: ChannelConfig
    menu: CompressionMenu

    def __post_init__(self) -> None:
        if not self.devices:
            raise ConfigError("the plan needs at least one device")
        names = [d.name for d in self.devices]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ConfigError(f"device names must be unique; repeated: {sorted(dup)}")
        lo, hi = self.cut_range
        if hi < lo:
            raise ConfigError(
                f"model {self.model.name} has {self.model.num_blocks} blocks: no cut leaves "
                f"{self.training.min_device_blocks} on each device and "
                f"{self.training.min_server_blocks} on the server"
            )

    @property
    def cut_range(self) -> tuple[int, int]:
        """Smallest and largest cut the structure allows (before memory limits)."""
        return self.training.min_device_blocks, self.model.num_blocks - self.training.min_server_blocks

    def with_menu(self, menu: CompressionMenu) -> PlanProblem:
        return dataclasses.replace(self, menu=menu)


@dataclass(frozen=True, kw_only=True, slots=True)
class Terms:
    """The problem reduced to per-device coefficients (units in the module doc)."""

    a0: FloatArray  # s/round: compute at cut 0 (embedding + all blocks on the server)
    a1: FloatArray  # s/round per block moved from the server to the device
    act_bits: float  # S·X: raw cut-tensor bits per round
    lora_bits: float  # Λ/E: adapter bits per block per round, each way
    compress_down: bool
    snr_up: FloatArray
    snr_down: FloatArray
    server0: float  # s/round of server time per device at cut 0
    server1: float  # s/round of server time saved per block on the device
    mem0: FloatArray  # bytes at cut 0
    mem1: FloatArray  # bytes per block
    mem_limit: FloatArray
    cut_lo: IntArray
    cut_hi: IntArray  # structural limit
    cut_cap: IntArray  # min(structural limit, memory limit)
    weights: FloatArray  # data shares, summing to 1
    ratios: FloatArray  # per menu option
    down_ratios: FloatArray  # per menu option: the gradients' ratio (when they are compressed)
    losses: FloatArray
    total_hz: float
    min_hz: float
    rounds_base: float
    rounds_per_loss: float
    max_loss: float

    @property
    def n(self) -> int:
        return len(self.a0)


def build_terms(problem: PlanProblem, channel: ChannelState) -> Terms:
    """Coefficients for ``problem`` under ``channel``; raises PlanInfeasible for hopeless inputs."""
    m, tr, devs = problem.model, problem.training, problem.devices
    a0, a1, server0, server1 = _compute_coefficients(problem)
    mem0, per_block, limits, cap = _memory_coefficients(problem)
    _check_devices_fit(problem, cap, limits, mem0, per_block)
    _check_accuracy_reachable(problem)
    lo, hi = problem.cut_range
    weights = np.array([d.data_weight for d in devs], dtype=np.float64)
    return Terms(
        a0=a0,
        a1=a1,
        act_bits=float(tr.steps_per_round) * float(tr.tokens) * m.hidden * tr.activation_bytes * 8.0,
        lora_bits=m.lora_params_per_block * 32.0 / tr.aggregate_every,
        compress_down=tr.compress_gradients,
        snr_up=channel.snr_up_hz,
        snr_down=channel.snr_down_hz,
        server0=server0,
        server1=server1,
        mem0=np.full(len(devs), mem0),
        mem1=np.full(len(devs), per_block),
        mem_limit=limits,
        cut_lo=np.full(len(devs), lo, dtype=np.int64),
        cut_hi=np.full(len(devs), hi, dtype=np.int64),
        cut_cap=cap.astype(np.int64),
        weights=weights / weights.sum(),
        ratios=problem.menu.ratios,
        down_ratios=problem.menu.down_ratios,
        losses=problem.menu.losses,
        total_hz=problem.channel.bandwidth_hz,
        min_hz=problem.channel.b_min_hz,
        rounds_base=tr.rounds_base,
        rounds_per_loss=tr.rounds_per_loss,
        max_loss=tr.max_accuracy_loss,
    )


def _compute_coefficients(problem: PlanProblem) -> tuple[FloatArray, FloatArray, float, float]:
    """(a0, a1, server0, server1) in s/round: compute at cut 0 and per block on the device (module doc)."""
    m, tr = problem.model, problem.training
    tok = float(tr.tokens)
    f_blk = m.block_flops_per_token(tr.seq)
    beta = tr.backward_factor
    s = float(tr.steps_per_round)
    dev_flops = np.array([d.flops for d in problem.devices], dtype=np.float64)
    srv = problem.server.flops
    server0 = s * (1 + beta) * tok * (m.num_blocks * f_blk + m.head_flops_per_token) / srv
    server1 = s * (1 + beta) * tok * f_blk / srv
    a0 = s * tok * m.embed_flops_per_token / dev_flops + server0
    a1 = s * (1 + beta) * tok * f_blk / dev_flops - server1
    return a0, a1, server0, server1


def _memory_coefficients(problem: PlanProblem) -> tuple[float, float, FloatArray, IntArray]:
    """Bytes at cut 0 and per block, device limits (bytes), and each device's deepest cut that fits."""
    m, tr = problem.model, problem.training
    tok = float(tr.tokens)
    per_block = (
        m.bytes_per_block
        + m.lora_params_per_block * (2 + tr.optimizer_states_per_param) * tr.lora_bytes
        + tr.max_inflight * tok * m.saved_floats_per_token(tr.seq) * tr.activation_bytes
    )
    mem0 = m.embed_bytes + 2 * tok * m.hidden * tr.activation_bytes + tr.device_overhead_mb * MB
    limits = np.array([d.memory_mb * MB for d in problem.devices], dtype=np.float64)
    _, hi = problem.cut_range
    fits = np.floor((limits - mem0) / per_block + 1e-9).astype(np.int64)
    return mem0, per_block, limits, np.minimum(fits, hi)


def _check_devices_fit(
    problem: PlanProblem, cap: IntArray, limits: FloatArray, mem0: float, per_block: float
) -> None:
    """PlanInfeasible naming the first device whose memory cannot hold the smallest cut."""
    m, tr = problem.model, problem.training
    lo, _ = problem.cut_range
    for d, c, limit in zip(problem.devices, cap, limits, strict=True):
        if c < lo:
            need = (mem0 + lo * per_block) / MB
            raise PlanInfeasible(
                f"device {d.name!r}: memory_mb = {limit / MB:g} cannot hold the embedding and "
                f"{lo} block(s) of "
                f"{m.name} at batch {tr.batch} × seq {tr.seq}: needs {need:.1f} MB "
                f"(embedding {m.embed_bytes / MB:.1f} MB + {per_block / MB:.1f} MB per block); "
                "give it more memory or lower batch/seq"
            )


def _check_accuracy_reachable(problem: PlanProblem) -> None:
    """PlanInfeasible when even the menu's most accurate codec loses more than the limit."""
    menu, limit = problem.menu, problem.training.max_accuracy_loss
    if menu.losses.min() > limit:
        best = menu.options[int(np.argmin(menu.losses))]
        raise PlanInfeasible(
            f"accuracy target unreachable: the most accurate codec in the menu, {best.name}, loses "
            f"{best.loss:.3f} > max_accuracy_loss {limit:g}; "
            "raise the limit or add the identity codec"
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class PathTerms:
    """Per-device delay coefficients of concrete plans (leading axes: a batch of plans)."""

    a: FloatArray  # s/round of compute
    up_bits: FloatArray
    down_bits: FloatArray
    server_floor: FloatArray  # s/round the server needs for all devices
    accuracy_loss: FloatArray


def path_terms(terms: Terms, cuts: npt.ArrayLike, options: npt.ArrayLike) -> PathTerms:
    """Coefficients for integer ``cuts`` and menu ``options`` (arrays of shape (..., N))."""
    c = np.asarray(cuts, dtype=np.float64)
    k = np.asarray(options, dtype=np.int64)
    ratio = terms.ratios[k]
    down_ratio = terms.down_ratios[k] if terms.compress_down else np.ones_like(ratio)
    agg = c * terms.lora_bits
    return PathTerms(
        a=terms.a0 + terms.a1 * c,
        up_bits=terms.act_bits / ratio + agg,
        down_bits=terms.act_bits / down_ratio + agg,
        server_floor=np.sum(terms.server0 - terms.server1 * c, axis=-1),
        accuracy_loss=np.sum(terms.weights * terms.losses[k], axis=-1),
    )


def rounds(terms: Terms, accuracy_loss: FloatArray | float) -> FloatArray:
    return np.asarray(terms.rounds_base * (1.0 + terms.rounds_per_loss * np.asarray(accuracy_loss)))


def memory_bytes(terms: Terms, cuts: npt.ArrayLike) -> FloatArray:
    return np.asarray(terms.mem0 + terms.mem1 * np.asarray(cuts, dtype=np.float64))


def fixed_link_delays(
    terms: Terms,
    training: TrainingShape,
    cuts: npt.ArrayLike,
    options: npt.ArrayLike,
    uplink_bps: npt.ArrayLike,
    downlink_bps: npt.ArrayLike,
    rtt_s: npt.ArrayLike = 0.0,
) -> tuple[FloatArray, float]:
    """Per-device round delays (s) and the round delay over links of fixed rates (bit/s).

    For runs with emulated links (a topology's ``uplink_mbps``/``downlink_mbps``/``rtt_ms``):
    the same model with the Shannon rates replaced by the link rates; each micro-batch and each
    adapter exchange adds one round trip. An infinite rate (an unpaced link) costs no time.
    """
    p = path_terms(terms, cuts, options)
    up = p.up_bits / np.asarray(uplink_bps, dtype=np.float64)
    down = p.down_bits / np.asarray(downlink_bps, dtype=np.float64)
    round_trips = training.steps_per_round + 1.0 / training.aggregate_every
    delays = p.a + up + down + np.asarray(rtt_s, dtype=np.float64) * round_trips
    return delays, max(float(np.max(delays)), float(p.server_floor))


@dataclass(frozen=True, kw_only=True, slots=True)
class Score:
    """Total delay of a batch of integer plans under the exact min-max bandwidth split."""

    total_s: FloatArray
    round_s: FloatArray
    allocation: Allocation
    paths: PathTerms


def score(terms: Terms, cuts: npt.ArrayLike, options: npt.ArrayLike) -> Score:
    """Score plans (shape (..., N)); plans over the accuracy limit score +inf."""
    p = path_terms(terms, cuts, options)
    alloc = minmax_bandwidth(
        p.a, p.up_bits, p.down_bits, terms.snr_up, terms.snr_down, terms.total_hz, terms.min_hz
    )
    round_s = np.maximum(alloc.max_delay_s, p.server_floor)
    total = rounds(terms, p.accuracy_loss) * round_s
    total = np.where(p.accuracy_loss <= terms.max_loss * (1 + 1e-9) + 1e-12, total, np.inf)
    return Score(total_s=total, round_s=round_s, allocation=alloc, paths=p)
