"""How a federated run's training data is divided between its clients: a seeded IID shuffle, the label-skewed
Dirichlet split (Hsu et al. 2019: each class's examples shared out by Dir(α) proportions, so client sizes vary too),
or its equal-size form (each client's label mix drawn from Dir(α), every client the same size), on encoded examples
(dicts; classification ones carry an int "label"), and the checks every client's data passes before any training."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from numbers import Integral, Real

import numpy as np

SCHEMES = ("iid", "dirichlet", "dirichlet-equal")
MAX_DRAWS = 100
FEWER = "use fewer clients, or more data"


class SplitError(ValueError):
    """A split request or a client's data that cannot work: the message names the problem and the fix."""


def _int(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < low:
        raise SplitError(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


def _alpha(alpha: object) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, Real) or not math.isfinite(alpha) or alpha <= 0:
        raise SplitError(f"alpha must be a finite number > 0 (0.1: strong label skew, 100: near iid), got {alpha!r}")
    return float(alpha)


def iid_split(n_examples: int, n_clients: int, seed: int) -> list[list[int]]:
    """Indices 0..n_examples-1 shuffled by `seed` and cut into `n_clients` parts whose sizes differ by at most 1."""
    n_examples, n_clients = _int("n_examples", n_examples, 0), _int("n_clients", n_clients, 1)
    if n_clients > n_examples:
        raise SplitError(f"{n_examples} examples cannot fill {n_clients} clients: {FEWER}")
    order = np.random.default_rng(_int("seed", seed, 0)).permutation(n_examples)
    return [sorted(part.tolist()) for part in np.array_split(order, n_clients)]


def dirichlet_split(
    labels: Sequence[int], n_clients: int, alpha: float, seed: int, min_examples: int = 1
) -> list[list[int]]:
    """Label-skewed split: each class's shuffled indices cut at the cumulative proportions p ~ Dir(alpha·1_N); the
    whole split is redrawn (same generator) until every client has `min_examples`, at most 100 times."""
    n_clients, alpha = _int("n_clients", n_clients, 1), _alpha(alpha)
    min_examples, rng = _int("min_examples", min_examples, 0), np.random.default_rng(_int("seed", seed, 0))
    if any(isinstance(y, bool) or not isinstance(y, Integral) for y in labels):
        raise SplitError("labels must be int class ids: a label-skewed split needs a classification task")
    labels = np.asarray(labels, dtype=np.int64)
    if n_clients * min_examples > len(labels):
        raise SplitError(f"{len(labels)} examples cannot fill {n_clients} clients with {min_examples} each: {FEWER}")
    sizes: list[int] = []
    for _ in range(MAX_DRAWS):
        parts: list[list[int]] = [[] for _ in range(n_clients)]
        for label in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == label))
            cuts = (np.cumsum(rng.dirichlet(np.full(n_clients, alpha)))[:-1] * len(idx)).astype(np.int64)
            for part, chunk in zip(parts, np.split(idx, cuts), strict=True):
                part.extend(chunk.tolist())
        sizes = [len(part) for part in parts]
        if min(sizes) >= min_examples:
            return [sorted(part) for part in parts]
    raise SplitError(
        f"{MAX_DRAWS} Dirichlet draws (alpha={alpha}) left a client with fewer than {min_examples} examples "
        f"(last draw's client sizes: {sizes}): raise alpha, {FEWER}"
    )


def equal_dirichlet_split(labels: Sequence[int], n_clients: int, alpha: float, seed: int) -> list[list[int]]:
    """Label skew without quantity skew: client i's label mix q_i ~ Dir(alpha·1_C); its n/N examples (sizes within
    1) are drawn one by one from the classes by q_i, renormalised over the classes not yet used up. A partition."""
    n_clients, alpha, rng = _int("n_clients", n_clients, 1), _alpha(alpha), np.random.default_rng(_int("seed", seed, 0))
    if any(isinstance(y, bool) or not isinstance(y, Integral) for y in labels):
        raise SplitError("labels must be int class ids: a label-skewed split needs a classification task")
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) < n_clients:
        raise SplitError(f"{len(labels)} examples cannot give each of {n_clients} clients one: {FEWER}")
    classes = np.unique(labels)
    pools = [list(rng.permutation(np.flatnonzero(labels == c))) for c in classes]
    mixes = rng.dirichlet(np.full(len(classes), alpha), size=n_clients)
    sizes = [len(part) for part in np.array_split(np.arange(len(labels)), n_clients)]
    parts: list[list[int]] = []
    for mix, size in zip(mixes, sizes, strict=True):
        part = []
        for _ in range(size):
            left = np.array([len(pool) > 0 for pool in pools], dtype=float) * mix
            if left.sum() == 0:  # this client's classes are used up: the classes left, in their remaining shares
                left = np.array([len(pool) for pool in pools], dtype=float)
            part.append(int(pools[rng.choice(len(pools), p=left / left.sum())].pop()))
        parts.append(sorted(part))
    return parts


def split_examples(
    examples: list[dict], n_clients: int, scheme: str, seed: int, alpha: float | None = None, min_examples: int = 1
) -> list[list[dict]]:
    """`examples` divided between `n_clients` by `scheme`: "iid"; "dirichlet" (needs `alpha` and labels; each client
    gets at least `min_examples`) or "dirichlet-equal" (the same label skew, equal client sizes)."""
    if scheme not in SCHEMES:
        raise SplitError(f"unknown split scheme {scheme!r}: use one of {', '.join(SCHEMES)}")
    if scheme == "iid":
        if alpha is not None:
            raise SplitError(
                "alpha is the Dirichlet concentration, for scheme='dirichlet' only: leave it out for 'iid'"
            )
        parts = iid_split(len(examples), n_clients, seed)
    else:
        if alpha is None:
            raise SplitError("scheme='dirichlet' needs alpha, e.g. 0.1 (strong label skew) to 100 (near iid)")
        if any("label" not in example for example in examples):
            raise SplitError("label-skewed splits need a classification task; use scheme='iid' or one file per client")
        labels = [example["label"] for example in examples]
        if scheme == "dirichlet":
            parts = dirichlet_split(labels, n_clients, alpha, seed, min_examples)
        else:
            parts = equal_dirichlet_split(labels, n_clients, alpha, seed)
    return [[examples[i] for i in part] for part in parts]


def check_clients(
    clients: list[list[dict]], names: list[str], label_names: list[str] | None = None, allow_unique_labels: bool = False
) -> None:
    """Refuse, before any training, a client with no examples and (unless `allow_unique_labels`, as for generated
    Dirichlet splits) a label id that only one of several clients holds."""
    if not clients or len(names) != len(clients):
        raise SplitError(f"{len(clients)} clients and {len(names)} names: a run needs >= 1 client, each named")
    for name, client in zip(names, clients, strict=True):
        if not client:
            raise SplitError(f"client {name!r} has no training examples: give it a non-empty data file, or {FEWER}")
    if len(clients) < 2 or allow_unique_labels:
        return
    held = [{example["label"] for example in client if "label" in example} for client in clients]
    holders = Counter(label for labels in held for label in labels)
    for name, labels in zip(names, held, strict=True):
        for label in sorted(labels):
            if holders[label] == 1:
                shown = repr(label_names[label]) if label_names and 0 <= label < len(label_names) else str(label)
                raise SplitError(
                    f"client {name!r} is the only client with label {shown} (id {label}): the global head would "
                    "learn that class from this one client alone, and no other client's data has it, so this is "
                    "probably a mislabelled or wrong file. Check that client's file, or give every client some "
                    f"examples of {shown}"
                )


def label_histogram(clients: list[list[dict]], n_labels: int) -> list[list[int]]:
    """Per client, how many of its examples carry each label id 0..n_labels-1."""
    counts = [[0] * _int("n_labels", n_labels, 1) for _ in clients]
    for row, client in zip(counts, clients, strict=True):
        for example in client:
            label = example.get("label")
            if isinstance(label, bool) or not isinstance(label, Integral) or not 0 <= label < n_labels:
                raise SplitError(f"label {label!r} is not a class id in 0..{n_labels - 1}: give n_labels = #classes")
            row[label] += 1
    return counts
