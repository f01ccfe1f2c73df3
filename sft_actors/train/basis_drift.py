"""A device's watch over its transform-coding basis while its adapters train.

The device's LoRA adapters change the activations at the cut; a basis fitted before training
describes them less and less well. :class:`BasisDrift` keeps the last ``window`` micro-batches'
cut activations (detached, on the host), says which micro-batches to measure (every
``check_every``-th: the codec decodes that frame once more), compares the measured relative
reconstruction error with the first one measured after the last fit, and fits the replacement
basis.
The actor uploads it and, once the server acknowledged it, makes it current
(:meth:`BasisDrift.fitted` and the session's registry), so the server always holds a basis
before the first frame coded with it.
"""

from __future__ import annotations

from collections import deque

import torch

from sft_actors.codec import Basis, BasisRegistry, ChainSpec, Codec, RefitSpec, fit_basis
from sft_actors.errors import CodecError, ConfigError

#: Seed of the measurement after a fit (the error of one frame; the value only has to be fixed).
MEASURE_SEED = 0


class BasisDrift:
    """Refit bookkeeping of one device's projecting up chain.

    ``chain`` must have a ``project`` stage (:class:`ConfigError` otherwise). Not thread-safe:
    the device actor calls it from one micro-batch loop (through its offload pool).
    """

    def __init__(self, chain: ChainSpec, spec: RefitSpec) -> None:
        if chain.project is None:
            raise ConfigError("basis drift needs an up chain with a project stage")
        self.chain, self.spec, self.key = chain, spec, chain.project.basis
        self._window: deque[torch.Tensor] = deque(maxlen=spec.window)
        self._observed = 0
        self._window_reported = False
        #: Relative error of the first frame measured after the last fit (None until measured).
        self.baseline: float | None = None
        #: Bytes of the first basis upload, not yet counted in a round's stats.
        self.pending_bytes = 0

    @property
    def enabled(self) -> bool:
        return self.spec.enabled

    def take_pending_bytes(self) -> int:
        """The first upload's bytes, once: the device's first round counts them."""
        n, self.pending_bytes = self.pending_bytes, 0
        return n

    def observe(self, hidden: torch.Tensor) -> tuple[bool, int | None]:
        """Keep a host copy of one micro-batch's cut activations (B, T, C).

        Returns (measure this micro-batch's frame?, the window's memory in bytes the first time
        the window is full, else None — to log once). Keeps nothing when refits are off."""
        if not self.enabled:
            return False, None
        self._window.append(hidden.detach().to("cpu", torch.float32, copy=True))
        self._observed += 1
        report = None
        if not self._window_reported and len(self._window) == self.spec.window:
            self._window_reported = True
            report = sum(t.numel() * t.element_size() for t in self._window)
        return self._observed % self.spec.check_every == 0, report

    def drifted(self, rel_error: float | None) -> bool:
        """Whether a measured relative error calls for a refit (never when refits are off).

        The first measurement after a fit becomes the baseline and never calls for one: it is
        taken on activations the fit did not see (an error measured on the fit's own data is
        lower, and comparing with it would refit at once)."""
        if not self.enabled or rel_error is None:
            return False
        if self.baseline is None:
            self.baseline = rel_error
            return False
        return rel_error > self.spec.threshold * self.baseline

    def measure(self, basis: Basis, sample: torch.Tensor) -> float:
        """Relative error ‖x̂ − x‖ / ‖x‖ of coding ``sample`` (B, T, C) with ``basis``, which
        need not be registered anywhere yet."""
        bases = BasisRegistry()
        bases.register(self.key, basis)
        codec = Codec(self.chain, bases=bases)
        encoded = codec.encode(sample.detach().to("cpu", torch.float32), MEASURE_SEED, measure_error=True)
        if encoded.report.rel_error is None:  # measure_error always sets it
            raise CodecError("the codec measured no reconstruction error")
        return float(encoded.report.rel_error)

    def refit(self) -> tuple[Basis, float]:
        """A basis fitted on the window, and the error of the latest micro-batch (one the fit
        saw, so a lower bound of what follows) coded with it.

        Only micro-batches shaped like the latest one are used (a short last batch of a shard
        may differ in T). Raises :class:`ConfigError` with an empty window or non-finite values.
        """
        if not self._window:
            raise ConfigError("no activations kept to refit the basis from")
        latest = self._window[-1]
        kept = [t for t in self._window if t.shape[1:] == latest.shape[1:]]
        basis = fit_basis(self.chain, torch.cat(kept))
        return basis, self.measure(basis, latest)

    def fitted(self) -> None:
        """A new basis is current: the next measurement is its baseline."""
        self.baseline = None
