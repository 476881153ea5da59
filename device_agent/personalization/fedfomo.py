"""FedFomo: first-order weighting of peer models, and choosing which peers to ask for.

Zhang, Sapra, Fidler, Yeung, Alvarez, "Personalized Federated Learning with
First Order Model Optimization", ICLR 2021 (arXiv:2012.08565).

Each round device i receives candidate models theta_n from peers, measures
their loss L_n on its own validation split, and compares with the loss L_i of
its current model theta_i. A candidate whose loss is lower, per unit of
parameter distance, pulls the device towards it (the paper's Eq. 5 and 6)::

    s_n = (L_i - L_n) / ||theta_n - theta_i||_2
    w_n = max(0, s_n) / sum_m max(0, s_m)
    theta_i_new = theta_i + sum_n w_n (theta_n - theta_i)

When no candidate beats the current model every w_n is 0: the device keeps
its own model (the delta is zero). A candidate identical to the current model
(distance 0) gets score 0: moving towards it changes nothing.

Which peers to ask for next round (the paper's section 3.3) is
epsilon-greedy over an affinity vector P_i, one entry per peer: after a round
each asked peer's entry grows by the weight it earned (:func:`update_affinity`);
:func:`select_candidates` then takes the k peers with the highest affinity,
except that each slot is, with probability epsilon, a uniformly random peer
instead. epsilon decays linearly per round (:func:`exploration_rate`; the
reference implementation starts at 0.3 and subtracts 0.05 a round, and asks
for 8 peers). The randomness comes from an injected ``numpy.random.Generator``.
Start P_i at zeros: ties are broken at random, so early rounds explore.

Adaptation to fedge's shared layers + personal head. Only the shared layers
travel, so candidates differ from the device's model only there: the device
evaluates a candidate by loading the candidate's shared layers next to its
own personal head and computing the loss on its own validation split (L_i
is the same evaluation of its current shared layers with the same head).
Distances and the update cover the shared layers only; the personal head is
untouched. All parameter dicts here are shared-layer dicts. The reference
implementation also offers an L1 distance; fedge uses L2 over all shared
tensors flattened into one vector.

Pure numpy in, numpy out: no torch, no onnx, no I/O. Results are float32.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeAlias

import numpy as np

ParameterDict: TypeAlias = Mapping[str, np.ndarray]
"""Shared-layer parameter name -> array."""

Vector: TypeAlias = Sequence[float] | np.ndarray
"""A one-dimensional sequence of numbers, one per candidate (or per peer)."""


@dataclass(frozen=True, kw_only=True)
class FomoUpdate:
    """The outcome of one FedFomo step for one device.

    ``scores``: the signed first-order scores s_n, one per candidate.
    ``distances``: ||theta_n - theta_i||_2 over the shared layers.
    ``weights``: w_n, >= 0, summing to 1, or all 0 when no candidate helps.
    ``delta``: sum_n w_n (theta_n - theta_i), float32; all zeros when the device keeps its model.
    ``parameters``: theta_i + delta, float32: the device's new shared layers.
    """

    scores: np.ndarray
    distances: np.ndarray
    weights: np.ndarray
    delta: dict[str, np.ndarray]
    parameters: dict[str, np.ndarray]

    @property
    def kept_own(self) -> bool:
        """True when no candidate was better (or there were none): the model is unchanged."""
        return not bool(np.any(self.weights > 0))


def _real_array(what: str, value: object) -> np.ndarray:
    arr = np.asarray(value)
    if arr.dtype == np.bool_ or not (
        np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)
    ):
        raise TypeError(f"{what}: dtype {arr.dtype} is not a real number type")
    return arr.astype(np.float64, copy=False)


def _checked_like(own: ParameterDict, other: ParameterDict, what: str) -> dict[str, np.ndarray]:
    """``other`` as float64 arrays, after checking it has ``own``'s names and shapes and is finite."""
    if not isinstance(other, Mapping):
        raise TypeError(f"{what}: expected a mapping of name -> array, got {type(other).__name__}")
    missing = sorted(set(own) - set(other))
    unexpected = sorted(set(other) - set(own))
    if missing or unexpected:
        raise ValueError(f"{what}: missing parameters {missing}, unexpected parameters {unexpected}")
    out = {}
    for name, ref in own.items():
        arr = _real_array(f"{what} parameter {name!r}", other[name])
        if arr.shape != np.shape(ref):
            raise ValueError(f"{what}: parameter {name!r} has shape {arr.shape}, expected {np.shape(ref)}")
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{what}: parameter {name!r} holds NaN or infinite values")
        out[name] = arr
    return out


def _own_checked(own: ParameterDict) -> dict[str, np.ndarray]:
    if not isinstance(own, Mapping) or not own:
        raise ValueError("own model: expected a non-empty mapping of name -> array")
    return _checked_like(own, own, "own model")


def _distance(own64: Mapping[str, np.ndarray], other64: Mapping[str, np.ndarray]) -> float:
    return math.sqrt(sum(float(np.sum((other64[n] - own64[n]) ** 2)) for n in own64))


def parameter_distance(a: ParameterDict, b: ParameterDict) -> float:
    """||a - b||_2 with all tensors flattened into one vector (float64).

    Raises ``ValueError`` when the names or shapes differ or a value is not finite.
    """
    return _distance(_own_checked(a), _checked_like(a, b, "other model"))


def _as_vector(what: str, values: object) -> np.ndarray:
    arr = _real_array(what, values)
    if arr.ndim != 1:
        raise ValueError(f"{what} must be one-dimensional, got shape {arr.shape}")
    return arr


def fomo_scores(own_loss: float, candidate_losses: Vector, distances: Vector) -> np.ndarray:
    """The signed scores s_n = (L_i - L_n) / d_n (float64); 0 where d_n is 0.

    ``own_loss`` must be finite. A candidate loss of +inf (the candidate
    failed on this device's data) scores -inf and will get weight 0; NaN or
    -inf losses and negative or non-finite distances raise ``ValueError``.
    """
    own = float(own_loss)
    if not math.isfinite(own):
        raise ValueError(f"own_loss must be finite, got {own}")
    losses = _as_vector("candidate_losses", candidate_losses)
    dists = _as_vector("distances", distances)
    if losses.shape != dists.shape:
        raise ValueError(f"{losses.size} candidate losses but {dists.size} distances")
    if np.any(np.isnan(losses)) or np.any(losses == -np.inf):
        raise ValueError("candidate losses must not be NaN or -inf")
    if not np.all(np.isfinite(dists)) or np.any(dists < 0):
        raise ValueError("distances must be finite and >= 0")
    scores = np.zeros_like(losses)
    moved = dists > 0
    scores[moved] = (own - losses[moved]) / dists[moved]
    return scores


def fomo_weights(scores: Vector) -> np.ndarray:
    """w_n = max(0, s_n) / sum_m max(0, s_m) (float64); all zeros when no score is positive.

    Raises ``ValueError`` for NaN or +inf scores (-inf is fine: weight 0).
    """
    s = _as_vector("scores", scores)
    if np.any(np.isnan(s)) or np.any(s == np.inf):
        raise ValueError("scores must not be NaN or +inf")
    positive = np.maximum(s, 0.0)
    top = positive.max(initial=0.0)
    if top == 0.0:
        return np.zeros_like(positive)
    scaled = positive / top  # dividing by the largest first keeps the sum from overflowing
    weights: np.ndarray = scaled / scaled.sum()
    return weights


def _pull64(
    own: ParameterDict, own64: Mapping[str, np.ndarray], candidates: Sequence[ParameterDict], weights: Vector
) -> dict[str, np.ndarray]:
    """sum_n w_n (theta_n - theta_i) in float64, one candidate at a time."""
    w = _as_vector("weights", weights)
    if w.size != len(candidates):
        raise ValueError(f"{len(candidates)} candidates but {w.size} weights")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError("weights must be finite and >= 0")
    total = {name: np.zeros(arr.shape, dtype=np.float64) for name, arr in own64.items()}
    for n, (candidate, weight) in enumerate(zip(candidates, w)):
        theta_n = _checked_like(own, candidate, f"candidate {n}")
        if weight == 0.0:
            continue
        for name, acc in total.items():
            acc += weight * (theta_n[name] - own64[name])
    return total


def fomo_delta(own: ParameterDict, candidates: Sequence[ParameterDict], weights: Vector) -> dict[str, np.ndarray]:
    """sum_n w_n (theta_n - theta_i) as float32; zeros when every weight is 0 or there are no candidates.

    Raises ``ValueError`` when the lengths differ, a weight is negative or
    not finite, or a candidate's names or shapes differ from ``own``.
    """
    pull = _pull64(own, _own_checked(own), candidates, weights)
    return {name: np.asarray(acc, dtype=np.float32) for name, acc in pull.items()}


def fomo_update(
    own: ParameterDict,
    candidates: Sequence[ParameterDict],
    *,
    own_loss: float,
    candidate_losses: Vector,
) -> FomoUpdate:
    """One FedFomo step: distances, scores, weights, delta and the new shared layers.

    ``own``: the device's current shared layers theta_i; ``own_loss``: their
    validation loss L_i (with the device's own head). ``candidates[n]`` and
    ``candidate_losses[n]``: a peer's shared layers and their loss on this
    device's validation split, with this device's head. No candidates, or
    none better, gives weights all 0, a zero delta and ``parameters`` equal
    to ``own`` (as float32). Errors as in :func:`fomo_scores` and :func:`fomo_delta`.
    """
    if len(candidates) != len(candidate_losses):
        raise ValueError(f"{len(candidates)} candidates but {len(candidate_losses)} losses")
    own64 = _own_checked(own)
    # One candidate at a time in float64: device memory stays O(model), not O(candidates x model).
    distances = np.array(
        [_distance(own64, _checked_like(own, c, f"candidate {n}")) for n, c in enumerate(candidates)],
        dtype=np.float64,
    )
    scores = fomo_scores(own_loss, np.asarray(candidate_losses, dtype=np.float64), distances)
    weights = fomo_weights(scores)
    pull = _pull64(own, own64, candidates, weights)
    return FomoUpdate(
        scores=scores,
        distances=distances,
        weights=weights,
        delta={name: np.asarray(acc, dtype=np.float32) for name, acc in pull.items()},
        parameters={name: np.asarray(own64[name] + pull[name], dtype=np.float32) for name in own64},
    )


def _check_affinity(affinity: object) -> np.ndarray:
    arr = _as_vector("affinity", affinity)
    if not np.all(np.isfinite(arr)):
        raise ValueError("affinity must be finite")
    return arr


def update_affinity(affinity: Vector, candidate_indices: Sequence[int] | np.ndarray, weights: Vector) -> np.ndarray:
    """A new affinity vector: ``affinity[candidate_indices[n]] += weights[n]`` (float64).

    The paper adds the normalised weights w_n. Passing the signed scores
    instead also lowers the affinity of peers that hurt (the reference code
    adds signed scores scaled by the absolute value of their sum). Indices
    must be distinct and in range; weights finite. The input is not modified.
    """
    p = _check_affinity(affinity).copy()
    idx = np.asarray(candidate_indices)
    if idx.size == 0:
        idx = idx.astype(np.int64)
    if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
        raise TypeError("candidate_indices must be a one-dimensional sequence of ints")
    w = _as_vector("weights", weights)
    if idx.size != w.size:
        raise ValueError(f"{idx.size} candidate indices but {w.size} weights")
    if np.any(idx < 0) or np.any(idx >= p.size):
        raise ValueError(f"candidate indices must be in range [0, {p.size})")
    if np.unique(idx).size != idx.size:
        raise ValueError("candidate indices must be distinct")
    if not np.all(np.isfinite(w)):
        raise ValueError("weights must be finite")
    p[idx] += w
    return p


def exploration_rate(round_index: int, *, initial: float = 0.3, decay: float = 0.05) -> float:
    """epsilon for a round: ``max(0, initial - round_index * decay)`` (the reference schedule).

    Raises ``ValueError`` for a negative round, ``initial`` outside [0, 1] or a negative ``decay``.
    """
    if round_index < 0:
        raise ValueError(f"round_index must be >= 0, got {round_index}")
    if not (0.0 <= initial <= 1.0) or not (decay >= 0.0 and math.isfinite(decay)):
        raise ValueError(f"need 0 <= initial <= 1 and finite decay >= 0, got {initial}, {decay}")
    return max(0.0, initial - round_index * decay)


def select_candidates(
    affinity: Vector,
    *,
    k: int,
    epsilon: float,
    rng: np.random.Generator,
    exclude: Collection[int] = (),
) -> np.ndarray:
    """Pick up to ``k`` distinct peer indices to ask for next round, epsilon-greedy on ``affinity``.

    Each of the k slots draws u ~ U[0, 1): below ``epsilon`` it takes the next
    peer of a random permutation, otherwise the next peer by descending
    affinity (ties broken at random), skipping peers already picked.
    ``exclude`` (typically the device's own index) is never picked. Fewer
    eligible peers than ``k`` returns them all. Returns int64 indices in the
    order picked; empty when ``k`` is 0 or no peer is eligible.
    """
    p = _check_affinity(affinity)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
        raise ValueError(f"k must be an int >= 0, got {k!r}")
    if not 0.0 <= epsilon <= 1.0:
        raise ValueError(f"epsilon must be in [0, 1], got {epsilon}")
    if not isinstance(rng, np.random.Generator):
        raise TypeError("rng must be a numpy.random.Generator")
    excluded = {int(i) for i in exclude}
    eligible = np.array([i for i in range(p.size) if i not in excluded], dtype=np.int64)
    # lexsort sorts by the last key first: descending affinity, then a random tiebreak.
    ranked = eligible[np.lexsort((rng.random(eligible.size), -p[eligible]))]
    shuffled = rng.permutation(eligible)
    picked: list[int] = []
    chosen: set[int] = set()
    cursors = {True: 0, False: 0}
    for _ in range(min(int(k), eligible.size)):
        explore = bool(rng.random() < epsilon)
        order = shuffled if explore else ranked
        while int(order[cursors[explore]]) in chosen:
            cursors[explore] += 1
        peer = int(order[cursors[explore]])
        cursors[explore] += 1
        picked.append(peer)
        chosen.add(peer)
    return np.array(picked, dtype=np.int64)
