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


#: Calibrated clipping range of a component: the |coefficient| quantile below which this
#: fraction of its calibration values falls.
CLIP_QUANTILE = 0.9995


@dataclass(kw_only=True, frozen=True, slots=True)
class Basis:
    """A transform-coding basis fitted on calibration activations.

    ``vectors``: (C, K) orthonormal columns ordered by decreasing variance (``kind="klt"``; the
    values are float16-representable, as they travel in float16), or ``None`` for
    ``kind="center"`` (identity: channels are the components, K = C). ``mean``: (C,).
    ``scales``: (K,) standard deviation of each component on the calibration data; ``clip``:
    (K,) its calibrated clipping range (the :data:`CLIP_QUANTILE` quantile of |coefficient|).
    Raises :class:`ConfigError` on inconsistent shapes.
    """

    vectors: F32 | None
    mean: F32
    scales: F32
    clip: F32

    def __post_init__(self) -> None:
        c = self.mean.shape[0] if self.mean.ndim == 1 else -1
        if c < 1:
            raise ConfigError(f"basis mean must be (C,), got {self.mean.shape}")
        k = c if self.vectors is None else (self.vectors.shape[1] if self.vectors.ndim == 2 else -1)
        if self.vectors is not None and (self.vectors.ndim != 2 or self.vectors.shape[0] != c):
            raise ConfigError(
                f"basis must be (C, K) with a (C,) mean, got {self.vectors.shape}, {self.mean.shape}"
            )
        if not 1 <= k <= c:
            raise ConfigError(f"basis rank must be in [1, C], got {k} for C = {c}")
        if self.scales.shape != (k,) or self.clip.shape != (k,):
            raise ConfigError(
                f"basis scales and clip must be ({k},), got {self.scales.shape}, {self.clip.shape}"
            )

    @property
    def kind(self) -> str:
        return "center" if self.vectors is None else "klt"

    @property
    def channels(self) -> int:
        return int(self.mean.shape[0])

    @property
    def rank(self) -> int:
        return self.channels if self.vectors is None else int(self.vectors.shape[1])

    @property
    def digest(self) -> str:
        """Content hash: equal on both sides iff the bases are bit-identical."""
        h = hashlib.sha256(self.kind.encode())
        h.update(np.asarray([self.channels, self.rank], dtype=np.int64).tobytes())
        for part in (self.vectors, self.mean, self.scales, self.clip):
            if part is not None:
                h.update(np.ascontiguousarray(part, dtype=np.float32).tobytes())
        return h.hexdigest()[:32]

    @property
    def wire_bytes(self) -> int:
        """Bytes :meth:`to_wire` sends: float16 vectors, float32 mean, scales and clip."""
        vectors = 0 if self.vectors is None else 2 * self.vectors.size
        return vectors + 4 * (self.channels + 2 * self.rank)

    @classmethod
    def fit(
        cls, calibration: torch.Tensor, *, kind: str = "klt", rank: int | None = None, center: bool = True
    ) -> Basis:
        """Fit on calibration activations (..., C): the PCA eigenvectors of the channel
        covariance (``kind="klt"``, rounded to float16) or the identity (``"center"``), with the
        mean and each component's calibrated scale and clipping range.

        Raises :class:`ConfigError` for fewer than 2 tokens or non-finite values.
        """
        data = calibration.detach().reshape(-1, calibration.shape[-1]).to(torch.float64)
        if data.shape[0] < 2:
            raise ConfigError("fitting a basis needs at least 2 calibration tokens")
        if not bool(torch.isfinite(data).all()):
            raise ConfigError("calibration activations contain NaN or inf")
        if kind not in ("klt", "center"):
            raise ConfigError(f"basis kind must be 'klt' or 'center', got {kind!r}")
        zeros = torch.zeros(data.shape[1], dtype=torch.float64)
        mean32 = (data.mean(dim=0) if center else zeros).to(torch.float32)
        centered = data - mean32.to(torch.float64)
        vectors: F32 | None = None
        coeffs = centered
        if kind == "klt":
            cov = centered.T @ centered / (data.shape[0] - 1)
            eigvals, eigvecs = torch.linalg.eigh(cov)
            order = torch.argsort(eigvals, descending=True)
            keep = data.shape[1] if rank is None else min(rank, data.shape[1])
            # float16 on the wire: both sides use exactly the rounded vectors.
            v16 = eigvecs[:, order[:keep]].to(torch.float16).to(torch.float32)
            vectors = np.ascontiguousarray(v16.numpy())
            coeffs = centered @ v16.to(torch.float64)
        scales = coeffs.square().mean(dim=0).sqrt().to(torch.float32).numpy()
        clip = np.quantile(coeffs.abs().numpy(), CLIP_QUANTILE, axis=0)
        return cls(
            vectors=vectors,
            mean=np.ascontiguousarray(mean32.numpy()),
            scales=np.ascontiguousarray(scales, dtype=np.float32),
            clip=np.ascontiguousarray(clip, dtype=np.float32),
        )

    def to_wire(self) -> tuple[dict[str, Any], bytes]:
        """(msgpack-able meta, bytes) to send the basis: vectors as float16, the rest float32."""
        meta = {"kind": self.kind, "channels": self.channels, "rank": self.rank, "digest": self.digest}
        vectors = b"" if self.vectors is None else self.vectors.astype(np.float16).tobytes()
        rest = np.concatenate([self.mean, self.scales, self.clip]).astype(np.float32).tobytes()
        return meta, vectors + rest

    @classmethod
    def from_wire(cls, meta: dict[str, Any], payload: bytes) -> Basis:
        """Inverse of :meth:`to_wire`; :class:`CodecError` on a malformed or corrupted basis."""
        try:
            kind, digest = str(meta["kind"]), str(meta["digest"])
            channels, rank = int(meta["channels"]), int(meta["rank"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CodecError(
                f"basis meta needs kind, integer channels and rank, and a digest: {exc}"
            ) from exc
        bad_center = kind == "center" and rank != channels
        if kind not in ("klt", "center") or not 1 <= rank <= channels <= 1 << 16 or bad_center:
            raise CodecError(f"basis meta is inconsistent: kind {kind!r}, {channels} channels, rank {rank}")
        n_vec = 2 * channels * rank if kind == "klt" else 0
        if len(payload) != n_vec + 4 * (channels + 2 * rank):
            raise CodecError(f"basis payload of {len(payload)} bytes does not match {kind} {channels}x{rank}")
        vectors = None
        if kind == "klt":
            vectors = np.frombuffer(payload, dtype=np.float16, count=channels * rank).astype(np.float32)
            vectors = vectors.reshape(channels, rank)
        rest = np.frombuffer(payload, dtype=np.float32, offset=n_vec).copy()
        basis = cls(
            vectors=vectors,
            mean=rest[:channels],
            scales=rest[channels : channels + rank],
            clip=rest[channels + rank :],
        )
        if basis.digest != digest:
            raise CodecError("basis digest does not match its bytes: the basis was corrupted in transit")
        return basis


def fit_basis(chain: ChainSpec, calibration: torch.Tensor) -> Basis:
    """The PCA (KLT) basis ``chain``'s ``project`` stage needs, from calibration activations.

    ``calibration`` is (N, T, C): N sequences of T tokens at the cut (or (tokens, C)). The first
    ``outliers.first_tokens`` tokens of every sequence are left out of the fit, because the
    chain sends them densely anyway (attention sinks would otherwise dominate the covariance).
    Raises :class:`ConfigError` if the chain has no ``project`` stage, or (from
    :meth:`Basis.fit`) if fewer than 2 tokens remain or they are not finite.
    """
    if chain.project is None:
        raise ConfigError("this codec chain has no project stage: there is no basis to fit")
    if calibration.ndim == 2:  # (tokens, C): no sequences, so no first tokens to leave out
        calibration = calibration.unsqueeze(0)
        skip = 0
    else:
        skip = chain.outliers.first_tokens if chain.outliers is not None else 0
    # Full rank: the chain truncates to project.rank when it encodes, so one basis serves any rank.
    return Basis.fit(calibration[:, skip:, :], kind=chain.project.transform)


class BasisRegistry:
    """Bases shared by encoder and decoder of one run. Thread-safe.

    ``key`` names the basis a chain's ``project.basis`` uses; re-registering a key (a refit
    after the activations drifted) makes the new basis current for encoding, while frames coded
    with an earlier one still decode: every registered basis stays reachable by its digest.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._bases: dict[str, Basis] = {}
        self._by_digest: dict[str, Basis] = {}

    def register(self, key: str, basis: Basis) -> None:
        with self._lock:
            self._bases[key] = basis
            self._by_digest[basis.digest] = basis

    def get(self, key: str, digest: str | None = None) -> Basis:
        """The current basis under ``key`` or, given ``digest``, the one with that digest.

        Raises :class:`CodecError` when none is registered."""
        with self._lock:
            basis = self._bases.get(key) if digest is None else self._by_digest.get(digest)
        if basis is None:
            what = f"under {key!r}" if digest is None else f"with digest {digest} (for {key!r})"
            raise CodecError(f"no basis registered {what}: register it on both sides before use")
        return basis

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._bases


def project(rows: F32, basis: Basis, rank: int) -> F32:
    """Coefficients (N, rank) of rows (N, C); a ``center`` basis keeps all C channels."""
    centered = rows - basis.mean
    if basis.vectors is None:
        return np.ascontiguousarray(centered, dtype=np.float32)
    return np.ascontiguousarray(centered @ basis.vectors[:, :rank], dtype=np.float32)


def unproject(coeffs: F32, basis: Basis, rank: int) -> F32:
    """Rows (N, C) from coefficients (N, rank)."""
    out = coeffs.copy() if basis.vectors is None else coeffs @ basis.vectors[:, :rank].T
    out += basis.mean
    return np.ascontiguousarray(out, dtype=np.float32)
