"""Who computes and transmits: device and server profiles, and the wireless channel.

Channel model (uplink and downlink share a device's band, used one after the other within a
step, as in TDD):

- path loss, log-distance: ``PL_dB(d) = reference_loss_db + 10·α·log10(d / reference_distance_m)``
  with ``α = path_loss_exponent``;
- small-scale fading: Rayleigh, so the power gain ``|h|²`` is Exp(1), drawn from a seeded
  generator (one draw per device; reciprocity makes up and down the same);
- channel power gain ``g = 10^(−PL_dB/10) · |h|²``;
- Shannon rate over bandwidth ``B`` (Hz) with transmit power ``p`` (W) and noise PSD ``N0``
  (W/Hz): ``r = B · log2(1 + p·g / (N0·B))`` bit/s. We carry ``P = p·g/N0`` (Hz), the received
  SNR times bandwidth, so ``r = B · log2(1 + P/B)``, which rises with ``B`` toward ``P / ln 2``.

Uplink uses the device's transmit power, downlink the server's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

from sft_actors.errors import ConfigError

FloatArray = npt.NDArray[np.float64]
Fading = Literal["rayleigh", "none"]


def dbm_to_watts(dbm: float | FloatArray) -> float | FloatArray:
    """Power in dBm → watts."""
    return 10.0 ** ((dbm - 30.0) / 10.0)


@dataclass(frozen=True, kw_only=True, slots=True)
class DeviceProfile:
    """One device: memory limit (MB = 10⁶ bytes), sustained FLOP/s, distance (m), power (dBm).

    ``data_weight`` is the device's share of the training samples (relative; normalised over
    devices) and weighs its codec's accuracy loss.
    """

    name: str
    memory_mb: float
    flops: float
    distance_m: float
    tx_power_dbm: float = 20.0
    data_weight: float = 1.0

    def __post_init__(self) -> None:
        for key in ("memory_mb", "flops", "distance_m", "data_weight"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"device {self.name!r}: {key} = {getattr(self, key)} must be > 0")


@dataclass(frozen=True, kw_only=True, slots=True)
class ServerProfile:
    """The edge server: sustained FLOP/s (shared by all devices) and transmit power (dBm)."""

    flops: float
    tx_power_dbm: float = 30.0

    def __post_init__(self) -> None:
        if not self.flops > 0:
            raise ConfigError(f"server flops = {self.flops} must be > 0")


@dataclass(frozen=True, kw_only=True, slots=True)
class ChannelConfig:
    """The shared wireless band and its propagation model (see the module doc).

    ``bandwidth_hz`` is the total to split among devices; each device gets at least
    ``b_min_hz``.
    """

    bandwidth_hz: float = 20e6
    noise_psd_dbm_hz: float = -174.0
    path_loss_exponent: float = 3.0
    reference_distance_m: float = 1.0
    reference_loss_db: float = 40.0
    fading: Fading = "rayleigh"
    b_min_hz: float = 100e3

    def __post_init__(self) -> None:
        if not self.bandwidth_hz > 0:
            raise ConfigError(f"channel bandwidth_hz = {self.bandwidth_hz} must be > 0")
        if self.b_min_hz < 0:
            raise ConfigError(f"channel b_min_hz = {self.b_min_hz} must be ≥ 0")
        if not self.reference_distance_m > 0 or self.path_loss_exponent < 0:
            raise ConfigError("channel reference_distance_m must be > 0 and path_loss_exponent ≥ 0")
        if self.fading not in ("rayleigh", "none"):
            raise ConfigError(f"channel fading = {self.fading!r}; use 'rayleigh' or 'none'")

    def path_gain(self, distance_m: float | FloatArray) -> FloatArray:
        """Large-scale power gain (linear, < 1) at ``distance_m``."""
        d = np.maximum(np.asarray(distance_m, dtype=np.float64), self.reference_distance_m)
        loss_db = self.reference_loss_db + 10.0 * self.path_loss_exponent * np.log10(
            d / self.reference_distance_m
        )
        return np.asarray(10.0 ** (-loss_db / 10.0), dtype=np.float64)


@dataclass(frozen=True, kw_only=True, slots=True)
class ChannelState:
    """One channel realisation: ``snr_up_hz[n]`` / ``snr_down_hz[n]`` are ``P = p·g/N0`` (Hz)."""

    gains: FloatArray
    snr_up_hz: FloatArray
    snr_down_hz: FloatArray
    seed: int | None


def shannon_rate(bandwidth_hz: float | FloatArray, snr_hz: float | FloatArray) -> FloatArray:
    """``B · log2(1 + P/B)`` in bit/s (``P = p·g/N0`` in Hz); 0 where ``B`` is 0."""
    b = np.asarray(bandwidth_hz, dtype=np.float64)
    p = np.asarray(snr_hz, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = b * np.log2(1.0 + p / b)
    return np.asarray(np.where(b > 0, r, 0.0), dtype=np.float64)


def draw_channel(
    devices: Sequence[DeviceProfile],
    server: ServerProfile,
    config: ChannelConfig,
    seed: int | None = 0,
    *,
    mean: bool = False,
) -> ChannelState:
    """Draw the channel of every device. ``mean=True`` uses ``|h|² = 1`` (the fading average).

    The same seed gives the same gains; device ``n`` always takes the ``n``-th draw, so adding
    a device at the end does not change the others' channels.
    """
    distances = np.array([d.distance_m for d in devices], dtype=np.float64)
    gains = config.path_gain(distances)
    if config.fading == "rayleigh" and not mean:
        gains = gains * np.random.default_rng(seed).exponential(1.0, size=len(devices))
    noise_w_hz = float(dbm_to_watts(config.noise_psd_dbm_hz))
    p_dev = np.array([float(dbm_to_watts(d.tx_power_dbm)) for d in devices], dtype=np.float64)
    p_srv = float(dbm_to_watts(server.tx_power_dbm))
    return ChannelState(
        gains=gains,
        snr_up_hz=p_dev * gains / noise_w_hz,
        snr_down_hz=p_srv * gains / noise_w_hz,
        seed=None if mean else seed,
    )
