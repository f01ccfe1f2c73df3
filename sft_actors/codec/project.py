"""Transform coding: a PCA/KLT basis fitted from calibration activations, sent once per run.

The basis lives in a :class:`BasisRegistry` that the caller owns (one per run and side; no global
state). Both sides register the same basis under the same key; every encoded tensor carries the
key and the basis digest, so a receiver holding a different basis refuses the tensor instead of
silently decoding garbage.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from sft_actors.codec.spec import ChainSpec
from sft_actors.errors import CodecError, ConfigError

F32 = npt.NDArray[np.float32]


@dataclass(kw_only=True, frozen=True, slots=True)
class Basis:
    """Orthonormal columns ``vectors`` (C, K), ordered by decreasing variance, and the mean (C,)."""

    vectors: F32
    mean: F32

    def __post_init__(self) -> None:
        if self.vectors.ndim != 2 or self.mean.shape != (self.vectors.shape[0],):
            raise ConfigError(
                f"basis must be (C, K) with a (C,) mean, got {self.vectors.shape}, {self.mean.shape}"
            )
        if self.vectors.shape[1] > self.vectors.shape[0] or self.vectors.shape[1] < 1:
            raise ConfigError(f"basis rank must be in [1, C], got shape {self.vectors.shape}")

    @property
    def channels(self) -> int:
        return int(self.vectors.shape[0])

    @property
    def rank(self) -> int:
        return int(self.vectors.shape[1])

    @property
    def digest(self) -> str:
        """Content hash: equal on both sides iff the bases are bit-identical."""
        h = hashlib.sha256()
        h.update(np.asarray(self.vectors.shape, dtype=np.int64).tobytes())
        h.update(np.ascontiguousarray(self.vectors).tobytes())
        h.update(np.ascontiguousarray(self.mean).tobytes())
        return h.hexdigest()[:32]

    @classmethod
    def fit(cls, calibration: torch.Tensor, *, rank: int | None = None, center: bool = True) -> Basis:
        """PCA of calibration activations (..., C): eigenvectors of the channel covariance."""
        data = calibration.detach().reshape(-1, calibration.shape[-1]).to(torch.float64)
        if data.shape[0] < 2:
            raise ConfigError("fitting a basis needs at least 2 calibration tokens")
        if not bool(torch.isfinite(data).all()):
            raise ConfigError("calibration activations contain NaN or inf")
        mean = data.mean(dim=0) if center else torch.zeros(data.shape[1], dtype=torch.float64)
        centered = data - mean
        cov = centered.T @ centered / (data.shape[0] - 1)
        eigvals, eigvecs = torch.linalg.eigh(cov)
        order = torch.argsort(eigvals, descending=True)
        keep = data.shape[1] if rank is None else min(rank, data.shape[1])
        vectors = eigvecs[:, order[:keep]].to(torch.float32).numpy()
        return cls(vectors=np.ascontiguousarray(vectors), mean=mean.to(torch.float32).numpy())

    def to_wire(self) -> tuple[dict[str, Any], bytes]:
        """(msgpack-able meta, raw bytes) to send the basis once per run."""
        meta = {"channels": self.channels, "rank": self.rank, "digest": self.digest}
        return meta, np.ascontiguousarray(self.vectors).tobytes() + np.ascontiguousarray(self.mean).tobytes()

    @classmethod
    def from_wire(cls, meta: dict[str, Any], payload: bytes) -> Basis:
        try:
            channels, rank, digest = int(meta["channels"]), int(meta["rank"]), str(meta["digest"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CodecError(f"basis meta needs integer channels, rank and a digest: {exc}") from exc
        if not (1 <= rank <= channels <= 1 << 16) or len(payload) != 4 * channels * (rank + 1):
            raise CodecError(f"basis payload of {len(payload)} bytes does not match {channels}x{rank}")
        flat = np.frombuffer(payload, dtype=np.float32)
        basis = cls(
            vectors=flat[: channels * rank].reshape(channels, rank).copy(),
            mean=flat[channels * rank :].copy(),
        )
        if basis.digest != digest:
            raise CodecError("basis digest does not match its bytes: the basis was corrupted in transit")
        return basis


def fit_basis(chain: ChainSpec, calibration: torch.Tensor) -> Basis:
    """The PCA (KLT) basis ``chain``'s ``project`` stage needs, from calibration activations.

    ``calibration`` is (N, T, C): N sequences of T tokens at the cut. The first
    ``outliers.first_tokens`` tokens of every sequence are left out of the fit, because the
    chain sends them densely anyway (attention sinks would otherwise dominate the covariance).
    Raises :class:`ConfigError` if the chain has no ``project`` stage, or (from
    :meth:`Basis.fit`) if fewer than 2 tokens remain or they are not finite.
    """
    if chain.project is None:
        raise ConfigError("this codec chain has no project stage: there is no basis to fit")
    skip = chain.outliers.first_tokens if chain.outliers is not None else 0
    # Full rank: the chain truncates to project.rank when it encodes, so one basis serves any rank.
    return Basis.fit(calibration[:, skip:, :])


class BasisRegistry:
    """Named bases shared by encoder and decoder of one run. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._bases: dict[str, Basis] = {}

    def register(self, key: str, basis: Basis) -> None:
        with self._lock:
            old = self._bases.get(key)
            if old is not None and old.digest != basis.digest:
                raise ConfigError(f"basis {key!r} is already registered with different contents")
            self._bases[key] = basis

    def get(self, key: str) -> Basis:
        with self._lock:
            basis = self._bases.get(key)
        if basis is None:
            raise CodecError(f"no basis registered under {key!r}: register it on both sides before use")
        return basis

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._bases


def project(rows: F32, basis: Basis, rank: int) -> F32:
    """Coefficients (N, rank) of rows (N, C)."""
    return np.ascontiguousarray((rows - basis.mean) @ basis.vectors[:, :rank], dtype=np.float32)


def unproject(coeffs: F32, basis: Basis, rank: int) -> F32:
    out = coeffs @ basis.vectors[:, :rank].T
    out += basis.mean
    return np.ascontiguousarray(out, dtype=np.float32)
