"""LoRA averaging: FedAvg of the factors, or the exact average of the products, re-factorized.

A LoRA adapter adds ``scale · B · A`` to a frozen weight (Hu et al. 2021; ``A`` (r, in),
``B`` (out, r), ``scale = alpha / rank``). Averaging device *n*'s adapters with weights
``w_n`` (its samples over the samples of every device holding that block, ``Σ w_n = 1``):

- ``fedavg`` — FedAvg (McMahan et al., AISTATS 2017, arXiv:1602.05629) of each factor, as
  FedIT does for LoRA: ``B̄ = Σ w_n B_n``, ``Ā = Σ w_n A_n``. Cheap, but the product of averages
  is not the average of products: ``B̄Ā = Σ w_n B_n A_n − ½ Σ_{n,m} w_n w_m (B_n − B_m)(A_n − A_m)``,
  so ``B̄Ā`` misses the weighted covariance of the factors. It is exact when every device holds
  the same A (or the same B), e.g. FFA-LoRA (Sun et al., ICLR 2024), which freezes A.
- ``svd`` — the exact average ``ΔW = Σ w_n B_n A_n`` (out, in) re-factorized to rank r by a
  truncated SVD, ``ΔW ≈ U_r S_r V_rᵀ``, ``B' = U_r √S_r``, ``A' = √S_r V_rᵀ``: ``B'A'`` is the best
  rank-r approximation of ``ΔW`` (Eckart–Young), and equals it when ``ΔW`` has rank ≤ r. The
  same aggregation as FlexLoRA (Bai et al., NeurIPS 2024, arXiv:2402.11505; there per-client
  ranks). Others keep ``ΔW`` exactly by raising the rank (FLoRA, Wang et al., NeurIPS 2024,
  stacks the factors, rank N·r) or by folding ``ΔW − B̄Ā`` into the frozen weights (FedEx-LoRA,
  Singhal et al., ACL 2025); both change the frozen base, which devices here share read-only.
  The scale is common to every device, so ``scale · B'A'`` is the best rank-r approximation
  of ``scale · ΔW``: it needs no correction.

``ΔW`` is never formed. With ``B_cat = [w_1 B_1 … w_N B_N]`` (out, N·r) and ``A_cat = [A_1; …; A_N]``
(N·r, in), ``ΔW = B_cat A_cat``; thin QRs ``B_cat = Q_b R_b``, ``A_catᵀ = Q_a R_a`` reduce it to the
SVD of the (N·r, N·r) core ``R_b R_aᵀ``, so one projection costs O((out + in)·(N·r)² + (N·r)³)
instead of O(N·out·in·r) for the products plus O(out·in·min(out, in)) for a dense SVD; the
result is the same (exact arithmetic; fp64 here). The errors below come from the same factors
(‖ΔW − B'A'‖ = ‖S_{>r}‖, and the FedAvg gap through one more pair of QRs).

Special cases, so training can go on: a projection where ``B̄Ā`` already equals ``ΔW`` (one
device holds the block, or every ``B_n = 0`` as in fresh adapters, or all share A) keeps the FedAvg
factors — no change of basis. A component with a zero singular value gets ``B' = 0`` and the
FedAvg row of A, like a fresh LoRA component (B zero, A not), instead of a dead ``0 · 0`` pair
that no gradient could revive; if ``ΔW = 0`` this means ``B' = 0``, ``A' = Ā``.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from sft_actors.errors import ConfigError
from sft_actors.topology.schema import LORA_AVERAGING
from sft_actors.train.aggregate import Contribution, average_per_block

_A, _B = ".lora_A", ".lora_B"
#: ``‖B̄Ā − ΔW‖ ≤ this · ‖ΔW‖``: FedAvg is exact (fp64 round-off), keep its factors.
EXACT_RTOL = 1e-9
#: Singular values below this fraction of the largest, or of Σ w_n ‖B_n‖ ‖A_n‖ (the products'
#: scale, which bounds their round-off), count as zero; so do norms below the latter.
RANK_RTOL = 1e-10


@dataclass(frozen=True, kw_only=True, slots=True)
class ProjectionErrors:
    """Relative errors of one projection's average (0 when exact; inf when ``ΔW = 0`` and the
    approximation is not). ``norm`` is ‖ΔW‖_F, ``devices`` how many devices held it."""

    svd: float  # ‖ΔW − B'A'‖ / ‖ΔW‖ of the rank-r re-factorization
    fedavg: float  # ‖B̄Ā − ΔW‖ / ‖ΔW‖ of the FedAvg factors
    norm: float
    devices: int


@dataclass(frozen=True, kw_only=True, slots=True)
class AveragingStats:
    """One aggregation, over the projections that two or more devices held.

    ``*_error`` is the error over all of them (‖stacked errors‖ / ‖stacked ΔW‖), ``*_error_max``
    the worst projection's relative error; ``refactorized`` counts the projections whose
    factors changed basis (``svd`` only); ``ms`` is the wall time of the averaging."""

    method: str
    projections: int
    refactorized: int
    svd_error: float
    svd_error_max: float
    fedavg_error: float
    fedavg_error_max: float
    ms: float


@dataclass(frozen=True, kw_only=True, slots=True)
class AveragedLora:
    """The averaged tensors (input dtypes kept), the keys whose factors were re-factorized (their
    optimizer moments no longer match), per-projection errors (key prefix ``blocks.{i}.{proj}``)
    and the summary."""

    tensors: dict[str, torch.Tensor]
    refactorized: tuple[str, ...]
    stats: AveragingStats
    errors: dict[str, ProjectionErrors] = field(default_factory=dict)


def average_lora(contributions: list[Contribution], method: str = "fedavg") -> AveragedLora:
    """Average every key per block (:func:`~sft_actors.train.aggregate.average_per_block`) and,
    for ``method = "svd"``, replace each LoRA pair (``<p>.lora_A`` (r, in), ``<p>.lora_B``
    (out, r)) that several devices hold by the rank-r re-factorization of the sample-weighted
    ``Σ w_n B_n A_n``. ``fedavg`` returns exactly ``average_per_block``'s tensors; both methods
    measure both errors.

    Non-finite factors (the caller checks for them first: ``claims.check_adapters_finite``)
    never raise a LinAlgError: their pair keeps FedAvg and is not measured.

    Raises :class:`ConfigError` for an unknown method, a device holding one factor of a pair
    without the other, mismatched shapes, or a negative sample count.
    """
    if method not in LORA_AVERAGING:
        raise ConfigError(f"lora averaging {method!r} is not one of {', '.join(map(repr, LORA_AVERAGING))}")
    t0 = time.perf_counter()
    tensors = average_per_block(contributions)
    held = [c for c in contributions if c.n_samples > 0]
    holders: dict[str, list[Contribution]] = defaultdict(list)
    for c in held:
        for key in c.tensors:
            if key.endswith(_A):
                if key[: -len(_A)] + _B not in c.tensors:
                    raise ConfigError(f"{c.device} sent {key} without its {_B[1:]} factor")
                holders[key[: -len(_A)]].append(c)
            elif key.endswith(_B) and key[: -len(_B)] + _A not in c.tensors:
                raise ConfigError(f"{c.device} sent {key} without its {_A[1:]} factor")
    errors: dict[str, ProjectionErrors] = {}
    refactorized: list[str] = []
    with _one_thread():
        _refactorize_all(holders, method, tensors, errors, refactorized)
    stats = AveragingStats(
        method=method,
        projections=len(errors),
        refactorized=len(refactorized) // 2,
        svd_error=_pooled(list(errors.values()), "svd"),
        svd_error_max=max((e.svd for e in errors.values()), default=0.0),
        fedavg_error=_pooled(list(errors.values()), "fedavg"),
        fedavg_error_max=max((e.fedavg for e in errors.values()), default=0.0),
        ms=(time.perf_counter() - t0) * 1e3,
    )
    return AveragedLora(tensors=tensors, refactorized=tuple(refactorized), stats=stats, errors=errors)


def _refactorize_all(
    holders: dict[str, list[Contribution]],
    method: str,
    tensors: dict[str, torch.Tensor],
    errors: dict[str, ProjectionErrors],
    refactorized: list[str],
) -> None:
    """Measure every pair several devices hold; re-factorize it in ``tensors`` (``svd``) unless
    FedAvg is already exact."""
    for prefix, group in holders.items():
        if len(group) < 2:
            continue  # one device: its own factors are the average, exactly
        total = sum(c.n_samples for c in group)
        weights = [c.n_samples / total for c in group]
        a_list = [c.tensors[prefix + _A].detach().to(torch.float64) for c in group]
        b_list = [c.tensors[prefix + _B].detach().to(torch.float64) for c in group]
        try:
            b_new, a_new, err = refactorize(b_list, a_list, weights)
        except RuntimeError:  # a LinAlgError (non-finite factors): FedAvg stays, unmeasured
            continue
        errors[prefix] = err
        if method == "svd" and err.fedavg > EXACT_RTOL:
            tensors[prefix + _A] = a_new.to(tensors[prefix + _A].dtype)
            tensors[prefix + _B] = b_new.to(tensors[prefix + _B].dtype)
            refactorized += [prefix + _A, prefix + _B]


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run torch on one intra-op thread meanwhile (process-wide; restored after). The QRs and
    SVDs here are (out, N·r) and (N·r)² — too small to share: with 2 threads on a busy 2-core
    machine one aggregation took 4.4 s instead of 33 ms (bench/lora_averaging.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def refactorize(
    b_list: list[torch.Tensor], a_list: list[torch.Tensor], weights: list[float]
) -> tuple[torch.Tensor, torch.Tensor, ProjectionErrors]:
    """``(B', A', errors)``: the rank-r factors of ``ΔW = Σ w_n B_n A_n`` (``B_n`` (out, r),
    ``A_n`` (r, in), fp64; ``B'`` (out, r), ``A'`` (r, in)) and the relative errors of ``B'A'``
    and of the FedAvg factors against ``ΔW``. ``ΔW`` is not formed (see the module doc)."""
    rank = a_list[0].shape[0]
    w = torch.tensor(weights, dtype=torch.float64)
    b_cat = torch.cat([wn * b for wn, b in zip(w, b_list, strict=True)], dim=1)  # (out, N r)
    a_cat = torch.cat(a_list, dim=0)  # (N r, in)
    b_avg = b_cat.reshape(b_cat.shape[0], len(b_list), rank).sum(dim=1)  # (out, r)
    a_avg = sum((wn * a for wn, a in zip(w, a_list, strict=True)), torch.zeros_like(a_list[0]))  # (r, in)
    q_b, r_b = torch.linalg.qr(b_cat)  # (out, k), (k, N r)
    q_a, r_a = torch.linalg.qr(a_cat.T)  # (in, k'), (k', N r)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T)  # core (k, k'): ΔW = q_b u diag(s) vh q_aᵀ
    # Round-off of the products is relative to Σ w_n ‖B_n‖ ‖A_n‖, not to ‖ΔW‖ (which may be 0).
    tiny = RANK_RTOL * sum(
        float(wn * b.norm() * a.norm()) for wn, b, a in zip(w, b_list, a_list, strict=True)
    )

    def rounded(x: torch.Tensor) -> float:
        value = float(torch.linalg.vector_norm(x))
        return 0.0 if value <= tiny else value

    norm, tail = rounded(s), rounded(s[rank:])
    gap_l, gap_r = torch.cat([b_avg, -b_cat], dim=1), torch.cat([a_avg, a_cat], dim=0)
    gap = _lowrank_norm(gap_l, gap_r)
    gap = 0.0 if gap <= tiny else gap
    kept = min(rank, s.shape[0])
    live = s[:kept] > max(tiny, RANK_RTOL * float(s[0]))
    root = torch.where(live, s[:kept], torch.zeros_like(s[:kept])).sqrt()  # (kept,)
    b_new = torch.zeros_like(b_avg)
    a_new = a_avg.clone()  # components without a singular value keep Ā's row, with B' = 0
    b_new[:, :kept] = (q_b @ u[:, :kept]) * root  # (out, kept)
    a_svd = root[:, None] * (vh[:kept] @ q_a.T)  # (kept, in)
    a_new[:kept] = torch.where(live[:, None], a_svd, a_avg[:kept])
    errors = ProjectionErrors(svd=_rel(tail, norm), fedavg=_rel(gap, norm), norm=norm, devices=len(b_list))
    return b_new, a_new, errors


def _lowrank_norm(left: torch.Tensor, right: torch.Tensor) -> float:
    """‖left @ right‖_F for thin ``left`` (m, k) and ``right`` (k, n), through their QR factors
    (no (m, n) product, no cancellation of squared norms)."""
    r_l = torch.linalg.qr(left, mode="r")[1]  # (k, k)
    r_r = torch.linalg.qr(right.T, mode="r")[1]  # (k, k)
    return float(torch.linalg.matrix_norm(r_l @ r_r.T))


def _rel(err: float, norm: float) -> float:
    if norm > 0:
        return err / norm
    return 0.0 if err == 0 else math.inf


def _pooled(errors: list[ProjectionErrors], which: str) -> float:
    """‖stacked errors‖ / ‖stacked ΔW‖ over projections (0 when there are none); ``which`` is
    ``"svd"`` or ``"fedavg"``."""
    rel = [float(getattr(e, which)) for e in errors]
    num = math.sqrt(sum((x * e.norm) ** 2 for x, e in zip(rel, errors, strict=True) if math.isfinite(x)))
    return _rel(num, math.sqrt(sum(e.norm**2 for e in errors)))
