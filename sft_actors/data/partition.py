"""Split a dataset's samples across devices: IID, or non-IID by a Dirichlet(α) over labels.

Both schemes return one sorted ``int64`` index array per device; together they hold every
sample exactly once. The Dirichlet scheme is the usual federated-learning construction: for
each class, draw device proportions ``p ~ Dir(α·1)`` and deal that class's (shuffled) samples
out in those proportions. Small α gives each device few classes; large α approaches IID.

Every device must end up with at least ``min_per_device`` samples. Instead of redrawing until
that happens (which may never end for tiny α), empty devices take samples, one at a time, from
the device holding the most — from that device's most common class, so the skew survives.
All randomness comes from ``numpy.random.default_rng(seed)``: the same seed, labels and device
count give the same partition on every machine.
"""

from __future__ import annotations

import numpy as np

from sft_actors.errors import ConfigError


def _check_counts(num_samples: int, num_devices: int, min_per_device: int) -> None:
    if num_devices < 1:
        raise ConfigError(f"num_devices must be >= 1, got {num_devices}")
    if min_per_device < 0:
        raise ConfigError(f"min_per_device must be >= 0, got {min_per_device}")
    if num_samples < num_devices * min_per_device:
        raise ConfigError(
            f"{num_samples} samples cannot give {num_devices} devices at least {min_per_device} each; "
            "use fewer devices or more data"
        )


def iid_partition(
    num_samples: int, num_devices: int, *, seed: int, min_per_device: int = 1
) -> list[np.ndarray]:
    """A seeded shuffle of ``range(num_samples)`` dealt into near-equal shards (sizes differ by ≤ 1)."""
    _check_counts(num_samples, num_devices, min_per_device)
    order = np.random.default_rng(seed).permutation(num_samples)
    return [np.sort(part).astype(np.int64) for part in np.array_split(order, num_devices)]


def dirichlet_partition(
    labels: np.ndarray, num_devices: int, *, alpha: float, seed: int, min_per_device: int = 1
) -> list[np.ndarray]:
    """Non-IID shards: per class, device shares drawn from Dirichlet(``alpha``)."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ConfigError("labels must be a 1-D integer array")
    if not (alpha > 0 and np.isfinite(alpha)):
        raise ConfigError(f"alpha must be a positive finite number, got {alpha}")
    _check_counts(labels.size, num_devices, min_per_device)
    rng = np.random.default_rng(seed)
    shards: list[list[np.ndarray]] = [[] for _ in range(num_devices)]
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        shares = rng.dirichlet(np.full(num_devices, alpha))
        if not np.all(np.isfinite(shares)) or shares.sum() <= 0:
            # Very small alpha can underflow every gamma draw to 0: the limit is "one device".
            shares = np.eye(num_devices)[rng.integers(num_devices)]
        # Multinomial counts, not floor(cumsum(shares) * n): flooring hands every small class
        # (a one-module stdlib package has a single sample) to the last device.
        counts = rng.multinomial(members.size, shares / shares.sum())
        cuts = np.cumsum(counts)[:-1]
        for device, part in enumerate(np.split(members, cuts)):
            shards[device].append(part)
    parts = [np.concatenate(s) if s else np.empty(0, dtype=np.int64) for s in shards]
    _top_up(parts, labels, min_per_device)
    return [np.sort(p).astype(np.int64) for p in parts]


def _top_up(parts: list[np.ndarray], labels: np.ndarray, min_per_device: int) -> None:
    """Move samples from the largest shard to shards below ``min_per_device`` (in place)."""
    for device in range(len(parts)):
        while parts[device].size < min_per_device:
            donor = int(np.argmax([p.size for p in parts]))  # ties: lowest index, deterministic
            donor_labels = labels[parts[donor]]
            common = np.bincount(donor_labels).argmax()
            take = int(np.flatnonzero(donor_labels == common)[-1])
            parts[device] = np.append(parts[device], parts[donor][take])
            parts[donor] = np.delete(parts[donor], take)


def partition(
    labels: np.ndarray, num_devices: int, *, alpha: float | None, seed: int, min_per_device: int = 1
) -> list[np.ndarray]:
    """IID when ``alpha`` is None, else :func:`dirichlet_partition` with that α."""
    if alpha is None:
        return iid_partition(
            int(np.asarray(labels).size), num_devices, seed=seed, min_per_device=min_per_device
        )
    return dirichlet_partition(labels, num_devices, alpha=alpha, seed=seed, min_per_device=min_per_device)


def label_histogram(
    labels: np.ndarray, parts: list[np.ndarray], num_classes: int | None = None
) -> np.ndarray:
    """``(devices, classes)`` int64 counts of each label on each device."""
    labels = np.asarray(labels)
    classes = num_classes if num_classes is not None else (int(labels.max()) + 1 if labels.size else 0)
    return np.stack([np.bincount(labels[p], minlength=classes) for p in parts]).astype(np.int64)


def label_entropy(histogram: np.ndarray) -> np.ndarray:
    """Per-device entropy (bits) of the label distribution; 0 for a one-class or empty device."""
    counts = np.asarray(histogram, dtype=np.float64)
    totals = counts.sum(axis=1, keepdims=True)
    p = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
    logs = np.log2(p, out=np.zeros_like(p), where=p > 0)
    return np.asarray(np.maximum(-(p * logs).sum(axis=1), 0.0))  # no -0.0 for one-class devices


def format_histogram(
    histogram: np.ndarray, class_names: tuple[str, ...] | list[str], *, max_columns: int = 10, top: int = 3
) -> str:
    """A text table: one row per device with its size, class count, entropy and label counts.

    Up to ``max_columns`` classes are shown as columns; beyond that each row lists its ``top``
    most common classes instead, so a 200-class histogram still fits a terminal.
    """
    hist = np.asarray(histogram)
    names = [str(n) for n in class_names]
    entropy = label_entropy(hist)
    head = ["device", "samples", "classes", "entropy"]
    wide = hist.shape[1] <= max_columns
    head += [n[:10] for n in names] if wide else [f"top {top} classes (count)"]
    rows: list[list[str]] = []
    for d in range(hist.shape[0]):
        row = [f"dev{d}", str(int(hist[d].sum())), str(int((hist[d] > 0).sum())), f"{entropy[d]:.2f}"]
        if wide:
            row += [str(int(c)) for c in hist[d]]
        else:
            order = np.argsort(-hist[d], kind="stable")[:top]
            row.append(", ".join(f"{names[c]}:{int(hist[d, c])}" for c in order if hist[d, c] > 0))
        rows.append(row)
    total = hist.sum(axis=0)
    summary = [
        "all",
        str(int(total.sum())),
        str(int((total > 0).sum())),
        f"{label_entropy(total[None])[0]:.2f}",
    ]
    summary += [str(int(c)) for c in total] if wide else [""]
    rows.append(summary)
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    last = len(head) - 1

    def line(cells: list[str]) -> str:
        # numbers right-aligned; the free-text "top classes" column left-aligned
        return "  ".join(
            c.ljust(w) if (i == last and not wide) or i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return "\n".join([line(head), *(line(r) for r in rows)])
