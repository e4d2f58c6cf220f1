"""Exact top-k inner-product search, with a bf16 first pass where the CPU multiplies bf16 fast.

``faiss.knn`` (one fp32 BLAS product per block, then a heap per query) is bound by the fp32
matrix product. On CPUs with AMX tiles the same product in bf16 runs about 5x faster, but bf16
scores are not exact. ``bf16_rescored_knn`` uses them only to choose candidates and stays exact:

1. bf16 scores of every (query, item) pair; each query keeps its ``c`` best items (``c`` > k).
2. Those candidates are rescored in fp32 (``faiss.knn_inner_products_by_idx``) and the best k kept.
3. The rounding error of a bf16 score is bounded (``bf16_error_bounds``, from the norms of the
   vectors and of their rounding errors), so an item outside the candidates scores at most the
   c-th bf16 score plus that bound. A query whose k-th rescored score is above it provably has its
   exact answer. The few queries that are not certified are searched again with ``faiss.knn``.

Neighbour lists are the same on every CPU, with or without AMX, in any thread count
(:func:`canonical_top_k`): whichever kernel found the candidates, the final scores are float64
dot products rounded to float32 (so no longer depend on a BLAS library's summation order), and
equal scores are ordered by row, lower first. Duplicated vectors (the same photo listed twice) give
exactly equal scores; without this rule fp32 and bf16 search, or two machines, listed different
ones of them at the k-th place. ``exact_knn`` picks the method ("auto": bf16 first pass when the
CPU has AMX-BF16 and the search is large enough to pay for it).

``leave_one_out_knn`` is the same exact search for a set of vectors queried by its own rows (offline
evaluation: every item queries the others), optionally within groups (an oracle category filter).
There the similarity matrix is symmetric, so each pair of row blocks is multiplied once and serves
both blocks (half the arithmetic of ``exact_knn``); its candidates go through the same
:func:`canonical_top_k`, so both give the same lists.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Literal

import faiss
import numpy as np

ExactMethod = Literal["auto", "fp32", "bf16-rescored"]
EXACT_METHODS: tuple[str, ...] = ("auto", "fp32", "bf16-rescored")

BF16_UNIT_ROUNDOFF = 2.0**-8  # bf16 keeps 8 significant bits
#: "auto" uses the bf16 first pass for batches of at least this many queries over at least this
#: many items: there the product is compute-bound and bf16 pays for the one-off copy of the items
#: (0.2 s at 12,000 x 1280, 8 s at 1M); a few queries go to faiss.knn
BF16_MIN_QUERIES = 256
BF16_MIN_ITEMS = 2048
#: candidates per query: k plus a margin that grows with the items, since more items means more
#: near-ties at the k-th score. A query the candidates cannot certify is redone in fp32, which
#: reads every vector (2 s at 1M x 1280), so the margin is set to make that rare. Measured with
#: bench_index: fashion-small (12,000 items), k=10: 0 of 12,000 queries uncertified with 64
#: candidates; 1M perturbed vectors: 14 of 1,000 with 64, 0 with 128 (5.1 s vs 2.8 s).
CANDIDATE_MARGIN = 54
#: exact_knn asks its kernel for k + TIE_MARGIN rows, so that items tied at the k-th place are
#: among them and the tie rule can pick the lower rows (more are fetched for the rare query
#: with more ties than that)
TIE_MARGIN = 8
CANDIDATE_MARGIN_LARGE = 118  # from LARGE_INDEX items on
LARGE_INDEX = 2**17
#: bf16 scores per product (queries x items, 2 bytes each), and items per block of the bf16 copy
BLOCK_ELEMENTS = 2**25
ITEM_BLOCK = 32768
#: rows per block of the similarity matrix in :func:`leave_one_out_knn`
MATRIX_BLOCK = 4096


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """True when the CPU has AMX-BF16 tiles (oneDNN then multiplies bf16 several times faster than fp32)."""
    try:
        import torch

        return bool(torch.cpu._is_amx_tile_supported())
    except (ImportError, AttributeError, RuntimeError):  # pragma: no cover - old torch / no torch
        return False


@dataclass(frozen=True)
class Bf16Items:
    """bf16 copy of the item vectors, with what the error bound needs to know about the rounding.

    Stored as transposed (d, ITEM_BLOCK) blocks, each contiguous: the products read them as they
    are. A column slice of one (d, n) matrix is several times slower to multiply at 1M items (its
    rows lie n * 2 bytes apart)."""

    blocks_t: tuple  # torch.bfloat16 tensors (d, m): items [i * block_size, i * block_size + m)
    block_size: int
    max_norm: float  # max |x~| (x~: the bf16 vector)
    max_rounding_norm: float  # max |x - x~|

    def __len__(self) -> int:
        return sum(int(b.shape[1]) for b in self.blocks_t)

    @classmethod
    def from_vectors(cls, vectors: np.ndarray) -> "Bf16Items":
        """The bf16 blocks, and bounds on the norms from |x_i - x~_i| <= u |x_i| (round to nearest):
        |x - x~| <= u |x| and |x~| <= (1 + u) |x|. Measuring them instead would tighten the bound
        by a third but doubles the time of this copy (16 s at 1M x 1280)."""
        import torch

        blocks, max_norm = [], 0.0
        for start in range(0, len(vectors), ITEM_BLOCK):
            part = np.ascontiguousarray(vectors[start : start + ITEM_BLOCK], dtype=np.float32)
            max_norm = max(max_norm, float(_norms(part).max(initial=0.0)))
            with warnings.catch_warnings():  # read-only arrays (faiss storage, memory maps): only read
                warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                blocks.append(torch.from_numpy(part).to(torch.bfloat16).T.contiguous())
        u = BF16_UNIT_ROUNDOFF
        return cls(tuple(blocks), ITEM_BLOCK, (1 + u) * max_norm, u * max_norm)

    def matrix(self):
        """All items as one (n, d) bf16 tensor (a copy)."""
        import torch

        return torch.cat([b.T for b in self.blocks_t]) if self.blocks_t else torch.zeros(0, 0, dtype=torch.bfloat16)


def _norms(matrix) -> np.ndarray:
    """Row norms, rounded up a little so that float32 summation error cannot make them too small."""
    matrix = np.asarray(matrix)
    return np.sqrt(np.einsum("ij,ij->i", matrix, matrix, dtype=np.float32)) * np.float32(1 + matrix.shape[1] * 2.0**-22)


def _max_norm(vectors: np.ndarray) -> float:
    return float(_norms(vectors).max(initial=0.0)) if len(vectors) else 0.0


def bf16_error_bounds(rounded_query_norms, query_rounding_norms, items: Bf16Items, dim: int, magnitudes) -> np.ndarray:
    """Per query: the most an exact score can differ from its bf16 score r, for |r| <= ``magnitudes``.

    With q~, x~ the bf16 vectors and dq = q - q~, dx = x - x~ (both known):
    q.x - q~.x~ = q~.dx + dq.x~ + dq.dx, bounded by Cauchy-Schwarz with the norms; the fp32
    accumulation of q~.x~ adds at most dim * 2^-23 |q~| |x~|; the product is rounded to bf16 (unit
    roundoff u = 2^-8), so the fp32 sum t behind a bf16 score r was within u |r| / (1 - u) of it."""
    a, qa = np.asarray(rounded_query_norms, np.float64), np.asarray(query_rounding_norms, np.float64)
    b, xb = items.max_norm, items.max_rounding_norm
    r = np.abs(np.asarray(magnitudes, np.float64))
    u = BF16_UNIT_ROUNDOFF
    return (a * xb + qa * b + qa * xb) + dim * 2.0**-23 * a * b + u * r / (1 - u)


def exact_knn(
    queries: np.ndarray,
    vectors: np.ndarray,
    k: int,
    *,
    method: ExactMethod = "auto",
    bf16_items: Bf16Items | None = None,
    max_item_norm: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product: (scores, row numbers into ``vectors``), both (nq, k), best
    first, equal scores by lower row (:func:`canonical_top_k`).

    Rows with fewer than k items are padded with -inf / -1, as ``faiss.knn`` does.
    ``bf16_items``: a cached :class:`Bf16Items` of ``vectors`` (saves converting them).
    ``max_item_norm``: a bound on the items' norms when the caller knows one (an index's vectors
    are unit length); otherwise it is measured, which reads every vector once."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n_items = len(vectors)

    def kernel(todo: np.ndarray, wanted: int) -> np.ndarray:
        q = queries[todo]
        if resolve_exact_method(method, len(q), n_items, wanted) == "bf16-rescored":
            return bf16_rescored_knn(q, vectors, wanted, bf16_items=bf16_items)[1]
        return faiss.knn(q, vectors, wanted, metric=faiss.METRIC_INNER_PRODUCT)[1]

    return _top_k_until_resolved(queries, vectors, k, kernel, n_eligible=n_items, max_item_norm=max_item_norm)


def _top_k_until_resolved(
    queries: np.ndarray, vectors: np.ndarray, k: int, kernel, *, n_eligible: int, max_item_norm: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(scores, rows) by the tie rule for every query: ``kernel(query numbers, c)`` returns the
    top-c candidate rows of those queries; queries :func:`canonical_top_k` leaves unresolved are
    asked again with 4x more candidates, up to all ``n_eligible`` items."""
    tolerance = kernel_tolerance(queries, _max_norm(vectors) if max_item_norm is None else max_item_norm)
    scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
    rows = np.full((len(queries), k), -1, dtype=np.int64)
    todo, wanted = np.arange(len(queries)), min(len(vectors), k + TIE_MARGIN)
    while len(todo):
        found = kernel(todo, wanted)
        s, r, unresolved = canonical_top_k(queries[todo], vectors, found, k, complete=wanted >= n_eligible, tolerance=tolerance[todo])
        done = ~unresolved
        scores[todo[done]], rows[todo[done]] = s[done], r[done]
        todo, wanted = todo[unresolved], min(len(vectors), 4 * wanted)
    return scores, rows


def canonical_scores(queries: np.ndarray, vectors: np.ndarray, rows: np.ndarray, block: int = 256) -> np.ndarray:
    """Scores of ``vectors[rows]`` (nq, c) for each query, float64 dot products rounded to float32
    (-inf where a row is -1). The products of two float32 numbers are exact in float64 and the sum's
    error is ~1e-13, so the rounded score is the same whatever order a CPU sums in."""
    out = np.full(rows.shape, -np.inf, dtype=np.float32)
    for start in range(0, len(rows), block):
        r = rows[start : start + block]
        q = queries[start : start + block].astype(np.float64)
        x = vectors[np.maximum(r, 0)].astype(np.float64)  # (b, c, d)
        s = np.matmul(x, q[:, :, None])[:, :, 0].astype(np.float32)
        out[start : start + block] = np.where(r >= 0, s, -np.inf)
    return out


def kernel_tolerance(queries: np.ndarray, max_item_norm: float) -> np.ndarray:
    """Per query: a bound on how far a float32 score from any kernel used here (BLAS products,
    faiss's per-pair products, bf16 candidates rescored in fp32) lies from the exact one:
    d * 2^-23 * |q| * max |x| (twice the classic bound for recursive summation)."""
    return queries.shape[1] * 2.0**-23 * _norms(queries).astype(np.float64) * float(max_item_norm)


def canonical_top_k(
    queries: np.ndarray, vectors: np.ndarray, candidates: np.ndarray, k: int, *, complete: bool,
    tolerance: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The project's tie rule: the k best of ``candidates`` (rows into ``vectors``, -1 = none) by
    :func:`canonical_scores`, equal scores by lower row. Returns (scores, rows, unresolved).

    ``candidates`` must be some kernel's top-c (c > k), or every eligible row (``complete``). An
    item outside them then scores (exactly) at most the lowest candidate's score plus the kernel
    error; where that could reach the k-th score, an item tied with it may be missing, and the
    query is ``unresolved``: search it again with more candidates."""
    candidates = np.asarray(candidates, dtype=np.int64)
    valid = candidates >= 0
    all_scores = canonical_scores(queries, vectors, candidates)
    order = np.lexsort((np.where(valid, candidates, np.iinfo(np.int64).max), -all_scores), axis=1)
    scores = np.take_along_axis(all_scores, order, axis=1)[:, :k]
    rows = np.take_along_axis(candidates, order, axis=1)[:, :k]
    if rows.shape[1] < k:
        pad = ((0, 0), (0, k - rows.shape[1]))
        scores, rows = np.pad(scores, pad, constant_values=-np.inf), np.pad(rows, pad, constant_values=-1)
    # a kernel that returned fewer rows than asked for returned every eligible one
    full = complete | (valid.sum(axis=1) < candidates.shape[1])
    if tolerance is None:
        tolerance = kernel_tolerance(queries, _max_norm(vectors))
    lowest = np.where(valid, all_scores, np.inf).min(axis=1).astype(np.float64)
    unresolved = ~full & (lowest + 2 * tolerance >= scores[:, k - 1].astype(np.float64))
    return scores, rows, unresolved


def resolve_exact_method(method: str, n_queries: int, n_items: int, k: int) -> str:
    """The method a search of this size runs: "fp32" or "bf16-rescored" ("auto" decided by
    :func:`use_bf16`; the bf16 pass also needs more items than its candidates)."""
    if method not in EXACT_METHODS:
        raise ValueError(f"exact search method must be one of {', '.join(EXACT_METHODS)}, got {method!r}")
    if method == "auto":
        method = "bf16-rescored" if use_bf16(n_queries, n_items, k) else "fp32"
    if method == "bf16-rescored" and n_items <= k + candidate_margin(n_items):
        return "fp32"
    return method


def candidate_margin(n_items: int) -> int:
    """How many candidates beyond k the bf16 pass keeps for an index of ``n_items``."""
    return CANDIDATE_MARGIN_LARGE if n_items >= LARGE_INDEX else CANDIDATE_MARGIN


def use_bf16(n_queries: int, n_items: int, k: int) -> bool:
    """Whether "auto" takes the bf16 first pass for a search of this size."""
    return (
        cpu_has_fast_bf16()
        and n_items >= max(BF16_MIN_ITEMS, 4 * (k + CANDIDATE_MARGIN))
        and n_queries >= BF16_MIN_QUERIES
    )


def bf16_rescored_knn(
    queries: np.ndarray,
    vectors: np.ndarray,
    k: int,
    *,
    bf16_items: Bf16Items | None = None,
    candidates: int | None = None,
    stats: dict | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k through a bf16 candidate pass, fp32 rescoring and a certificate (module doc).

    ``stats`` (optional dict) receives ``uncertified``: the queries redone with ``faiss.knn``."""
    import torch

    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    n_queries, dim = queries.shape
    n_items = len(vectors)
    c = min(n_items, candidates or k + candidate_margin(n_items))
    if c <= k or n_queries == 0:
        return faiss.knn(queries, vectors, k, metric=faiss.METRIC_INNER_PRODUCT)
    items = bf16_items if bf16_items is not None else Bf16Items.from_vectors(vectors)
    scores = np.empty((n_queries, k), dtype=np.float32)
    labels = np.empty((n_queries, k), dtype=np.int64)
    certified = np.empty(n_queries, dtype=bool)
    with torch.inference_mode():
        for start, stop, q_bf16, best_vals, best_rows in _query_candidates(queries, items, c):
            q = queries[start:stop]
            rounded = q_bf16.float().numpy()
            a, qa = _norms(rounded), _norms(q - rounded)
            vals = best_vals.float().numpy()  # bf16 scores, best first
            # rescore only candidates that can reach the top k: the k-th exact score is at least
            # vals[k-1] - slack, and a candidate scores at most its bf16 score + slack
            slack = bf16_error_bounds(a, qa, items, dim, np.abs(vals).max(axis=1))
            cand = np.where(vals >= (vals[:, k - 1] - 2 * slack)[:, None], best_rows.numpy(), -1)  # a prefix
            d = np.empty((stop - start, k), dtype=np.float32)
            i = np.empty((stop - start, k), dtype=np.int64)
            faiss.knn_inner_products_by_idx(
                faiss.swig_ptr(q), faiss.swig_ptr(vectors), faiss.swig_ptr(np.ascontiguousarray(cand, dtype=np.int64)),
                dim, stop - start, n_items, c, k, faiss.swig_ptr(d), faiss.swig_ptr(i), c,
            )  # fmt: skip  (the ids are read up to the first -1)
            scores[start:stop], labels[start:stop] = d, i
            # an item outside the candidates scores at most the c-th bf16 score + its slack
            cth = vals[:, -1]
            certified[start:stop] = d[:, -1] > cth + bf16_error_bounds(a, qa, items, dim, np.abs(cth))
    redo = np.flatnonzero(~certified)
    if len(redo):
        scores[redo], labels[redo] = faiss.knn(queries[redo], vectors, k, metric=faiss.METRIC_INNER_PRODUCT)
    if stats is not None:
        stats["uncertified"] = int(len(redo))
    return scores, labels


def _query_candidates(queries: np.ndarray, items: Bf16Items, c: int):
    """Per block of queries: (start, stop, the bf16 queries, values, rows) of the c best items by
    bf16 score, best first."""
    import torch

    widest = max(int(b.shape[1]) for b in items.blocks_t)
    query_block = max(1, min(len(queries), BLOCK_ELEMENTS // widest))
    # one score buffer for every product: a fresh 64 MB result per product costs more in page
    # faults than the product itself
    buffer = torch.empty(query_block * widest, dtype=torch.bfloat16)
    for start in range(0, len(queries), query_block):
        stop = min(len(queries), start + query_block)
        q_bf16 = torch.from_numpy(queries[start:stop]).to(torch.bfloat16)
        best = None
        for number, block in enumerate(items.blocks_t):
            sims = torch.matmul(q_bf16, block, out=buffer[: len(q_bf16) * block.shape[1]].view(len(q_bf16), -1))
            best = _merge_top(best, sims, number * items.block_size, c)
        vals, order = torch.sort(best[0], dim=1, descending=True)
        yield start, stop, q_bf16, vals, torch.gather(best[1], 1, order)


def _merge_top(best, sims, first_row: int, c: int):
    """The c best (values, item rows) of ``best`` and the score block ``sims`` (items from
    ``first_row``). The c-th merged value is >= the c-th of each part, so it bounds every item
    dropped on the way."""
    import torch

    vals, rows = torch.topk(sims, min(c, sims.shape[1]), dim=1, sorted=False)
    rows += first_row
    if best is None:
        return vals, rows
    vals_all, rows_all = torch.cat([best[0], vals], dim=1), torch.cat([best[1], rows], dim=1)
    vals, pick = torch.topk(vals_all, min(c, vals_all.shape[1]), dim=1, sorted=False)
    return vals, torch.gather(rows_all, 1, pick)


# ---------------------------------------------------------------- leave-one-out (evaluation)


def _top_k(sims: np.ndarray, k: int, labels: np.ndarray | None = None, chunk: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Labels (default: column numbers) and values of each row's k largest entries, best first,
    ties broken by the lower label.

    Wide rows are pruned first: split the columns into groups of ``chunk`` (group c holds
    columns c, c + G, c + 2G, ... for G groups, so the maxima are a fast reduction over the
    middle axis); the k largest entries lie in the k groups with the largest maxima, so only
    those ``k * chunk`` columns are partitioned. An entry tied with the k-th largest group
    maximum may be dropped for an equal one elsewhere."""
    n_rows, n_cols = sims.shape
    k = min(k, n_cols)
    if labels is None and n_cols % chunk == 0 and n_cols >= 4 * k * chunk:
        n_groups = n_cols // chunk
        maxima = sims.reshape(n_rows, chunk, n_groups).max(axis=1)
        best = np.argpartition(maxima, -k, axis=1)[:, -k:]
        cols = (best[:, :, None] + np.arange(chunk) * n_groups).reshape(n_rows, -1)
        vals = np.take_along_axis(sims, cols, axis=1)
    else:
        cols = np.broadcast_to(np.arange(n_cols), sims.shape) if labels is None else labels
        vals = sims
    if k < vals.shape[1]:
        part = np.argpartition(vals, -k, axis=1)[:, -k:]
        cols = np.take_along_axis(cols, part, axis=1)
        vals = np.take_along_axis(vals, part, axis=1)
    order = np.lexsort((cols, -vals), axis=1)
    return np.take_along_axis(cols, order, axis=1), np.take_along_axis(vals, order, axis=1)


def _top_k_of_columns(sims: np.ndarray, k: int, chunk: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_top_k` of ``sims.T`` without transposing the whole block: rows are grouped the
    same way (group g holds rows g, g + G, ...), the group maxima are a reduction over the
    leading axis, and only the k best groups' rows are gathered and transposed."""
    n_rows, n_cols = sims.shape
    k = min(k, n_rows)
    if n_rows % chunk or n_rows < 4 * k * chunk:
        return _top_k(np.ascontiguousarray(sims.T), k)
    n_groups = n_rows // chunk
    maxima = sims.reshape(chunk, n_groups, n_cols).max(axis=0)
    best = np.argpartition(maxima, -k, axis=0)[-k:]
    rows = (best[None, :, :] + (np.arange(chunk) * n_groups)[:, None, None]).reshape(-1, n_cols)
    vals = sims[rows, np.arange(n_cols)[None, :]]
    return _top_k(np.ascontiguousarray(vals.T), k, labels=np.ascontiguousarray(rows.T))


def _pool_top_k(pool: np.ndarray, rows: np.ndarray, k: int, block: int) -> np.ndarray:
    """Top-k positions within ``pool`` for its rows ``rows``, each row's own position excluded;
    -1 where fewer exist.

    When most rows are queries (leave-one-out), the similarity matrix is symmetric: each pair
    of row blocks is multiplied once and serves both blocks (half the arithmetic). Otherwise
    the query rows are multiplied by the whole pool, block by block."""
    n = len(pool)
    if 2 * len(rows) <= n:
        out_cols, out_vals = [], []
        for start in range(0, len(rows), block):
            r = rows[start : start + block]
            sims = pool[r] @ pool.T
            sims[np.arange(len(r)), r] = -np.inf
            c, v = _top_k(sims, k)
            out_cols.append(c)
            out_vals.append(v)
        cols, vals = np.vstack(out_cols), np.vstack(out_vals)
    else:
        starts = list(range(0, n, block))
        parts: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in starts]
        for bi, i0 in enumerate(starts):
            left = pool[i0 : i0 + block]
            for bj in range(bi, len(starts)):
                j0 = starts[bj]
                sims = left @ pool[j0 : j0 + block].T
                if bi == bj:
                    np.fill_diagonal(sims, -np.inf)
                c, v = _top_k(sims, k)
                parts[bi].append((c + j0, v))
                if bi != bj:
                    c, v = _top_k_of_columns(sims, k)
                    parts[bj].append((c + i0, v))
        merged = [_top_k(np.hstack([v for _, v in p]), k, labels=np.hstack([c for c, _ in p])) for p in parts]
        cols = np.vstack([c for c, _ in merged])[rows]
        vals = np.vstack([v for _, v in merged])[rows]
    found = np.where(np.isfinite(vals), cols, -1)
    if found.shape[1] < k:
        found = np.pad(found, ((0, 0), (0, k - found.shape[1])), constant_values=-1)
    return found


def leave_one_out_knn(
    vectors: np.ndarray, query_pos: np.ndarray, k: int, groups: np.ndarray | None = None, block: int = MATRIX_BLOCK
) -> np.ndarray:
    """Exact inner-product top-k over ``vectors`` for its own rows ``query_pos``, by blocks of the
    similarity matrix (leave-one-out evaluation: the query itself is excluded). With ``groups``
    (an int code per row) only rows of the query's group are searched, group by group. Returns
    row numbers (n, k), -1 where fewer exist, best first, with the project's tie rule
    (:func:`canonical_top_k`: equal scores by lower row), so the lists equal :func:`exact_knn`'s
    (the index layer's exact search) on any CPU."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    query_pos = np.asarray(query_pos, dtype=np.int64)
    out = np.full((len(query_pos), k), -1, dtype=np.int64)
    if groups is None:
        jobs = [(np.arange(len(query_pos)), np.arange(len(vectors)))]
    else:
        order = np.argsort(groups[query_pos], kind="stable")
        bounds = np.flatnonzero(np.diff(groups[query_pos][order])) + 1
        jobs = [(rows, np.flatnonzero(groups == groups[query_pos[rows[0]]])) for rows in np.split(order, bounds) if len(rows)]
    for rows, members in jobs:
        pool = vectors[members]
        local = np.searchsorted(members, query_pos[rows])  # the queries' positions within the pool
        _, best = _top_k_until_resolved(
            pool[local], pool, k, lambda todo, wanted: _pool_top_k(pool, local[todo], wanted, block), n_eligible=len(pool) - 1
        )  # fmt: skip  (the query itself is never a candidate: one item fewer is eligible)
        out[rows] = np.where(best >= 0, members[np.maximum(best, 0)], -1)
    return out


def neighbour_recall(found: np.ndarray, exact: np.ndarray) -> np.ndarray:
    """Per query: the share of the exact top-k row numbers (-1 = none) that ``found`` also lists
    (an approximate index's recall against exact search); 1.0 where the exact list is empty."""
    out = np.empty(len(found), dtype=np.float64)
    for i, (f, e) in enumerate(zip(found, exact)):
        e = e[e >= 0]
        out[i] = len(np.intersect1d(f[f >= 0], e)) / len(e) if len(e) else 1.0
    return out


__all__ = [
    "EXACT_METHODS", "MATRIX_BLOCK", "TIE_MARGIN", "Bf16Items", "bf16_error_bounds", "bf16_rescored_knn", "canonical_scores",
    "canonical_top_k", "cpu_has_fast_bf16", "exact_knn", "kernel_tolerance", "leave_one_out_knn", "neighbour_recall", "resolve_exact_method",
    "use_bf16",
]
