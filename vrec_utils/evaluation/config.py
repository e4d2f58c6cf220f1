"""What an evaluation computes: :class:`EvalConfig`, a frozen value checked when it is built.

Only checks that need nothing but the settings live here (cut-offs, metrics, intervals, the
relevance source, the backend); those that need the catalog or the embeddings (label columns
exist, fusion members are evaluated, k fits the candidates) are made by
:func:`vrec_utils.evaluation.protocol.evaluate`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import pandas as pd

from ..catalog import Split
from ..index import get_index_class
from ..metrics import check_gain, default_metrics, parse_metric

UNFILTERED = "unfiltered"
CI_METHODS = ("bca", "percentile")
MATRIX = "matrix"
GAIN_FORMULAS = {"exp2": "gain = 2**rel - 1 (Burges)", "linear": "gain = rel (Jarvelin-Kekalainen)"}
DEFAULT_LABEL = "articleType"


@dataclass(frozen=True)
class EvalConfig:
    """The settings of one evaluation (module doc of :mod:`vrec_utils.evaluation`).

    Relevance: one of ``label`` (binary; ``"articleType"`` when none of the three is given),
    ``hierarchy`` (graded, coarse to fine) or ``interactions`` (a log file or frame).
    Sequences are stored as sorted / canonical tuples: ``ks`` sorted and unique, ``metrics``
    canonical metric strings (default: ndcg, precision, recall, mrr, map at each k),
    ``pca_dims`` sorted and unique, ``index_options`` read-only."""

    label: str | None = None
    hierarchy: Sequence[str] | None = None
    interactions: str | os.PathLike | pd.DataFrame | None = None
    ks: Iterable[int] = (5, 10)
    metrics: Sequence[str] | None = None
    split: Split | None = None
    filter_column: str | None = None
    exclude_duplicates: bool = True
    gain: str = "exp2"
    pca_dims: Sequence[int] = ()
    fusions: Sequence[Sequence[str]] = ()
    n_bootstrap: int = 2000
    n_permutations: int = 10000
    ci_method: str = "bca"
    confidence: float = 0.95
    seed: int = 0
    backend: str = MATRIX
    index_options: Mapping[str, Any] = field(default_factory=dict)
    sample_queries: int | None = None  # large catalogs: this many queries, seeded, stratified by the label

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalise once, here
        check_gain(self.gain)
        ks = _check_ks(self.ks)
        set_(self, "ks", tuple(ks))
        metrics = [str(parse_metric(m)) for m in self.metrics] if self.metrics else [str(m) for m in default_metrics(ks)]
        set_(self, "metrics", tuple(metrics))
        if self.ci_method not in CI_METHODS:
            raise ValueError(f"ci_method must be one of {', '.join(CI_METHODS)}, got {self.ci_method!r}")
        if not 0 < self.confidence < 1:
            raise ValueError(f"confidence must be in (0, 1), got {self.confidence}")
        if self.sample_queries is not None and int(self.sample_queries) < 1:
            raise ValueError(f"sample_queries must be >= 1, got {self.sample_queries}")
        if self.n_bootstrap < 2 or self.n_permutations < 1:
            raise ValueError("n_bootstrap must be >= 2 and n_permutations >= 1")
        sources = [x is not None for x in (self.label, self.hierarchy, self.interactions)]
        if sum(sources) > 1:
            raise ValueError("give one relevance source: label, hierarchy or interactions")
        if sum(sources) == 0:
            set_(self, "label", DEFAULT_LABEL)
        if self.hierarchy is not None:
            set_(self, "hierarchy", tuple(self.hierarchy))
            if not self.hierarchy:
                raise ValueError("hierarchy needs at least one column, coarse to fine")
        set_(self, "fusions", tuple(tuple(members) for members in self.fusions))
        pca_dims = sorted({int(d) for d in self.pca_dims})
        if pca_dims and pca_dims[0] < 1:
            raise ValueError(f"pca dims must be positive, got {pca_dims}")
        set_(self, "pca_dims", tuple(pca_dims))
        if self.backend != MATRIX:
            get_index_class(self.backend)  # KeyError listing the registered backends
        elif self.index_options:
            raise ValueError("index_options apply to index backends (e.g. backend='faiss'), not to 'matrix'")
        set_(self, "index_options", MappingProxyType(dict(self.index_options or {})))

    @property
    def label_columns(self) -> list[str]:
        """The label columns of label / hierarchy relevance, coarse to fine ([] for interactions)."""
        return [self.label] if self.label is not None else list(self.hierarchy or [])

    @property
    def depth(self) -> int:
        """How many neighbours each query retrieves: the largest cut-off of any metric."""
        return max([self.ks[-1]] + [parse_metric(m).k or self.ks[-1] for m in self.metrics])


def _check_ks(ks: Iterable[int]) -> list[int]:
    ks = list(ks)
    out = sorted({int(k) for k in ks})
    if not out or out[0] < 1:
        raise ValueError(f"k must be positive integers, got {ks}")
    return out


__all__ = ["CI_METHODS", "DEFAULT_LABEL", "GAIN_FORMULAS", "MATRIX", "UNFILTERED", "EvalConfig"]
