"""Sharded IVF build + on-disk merge (faiss.contrib.ondisk), searched memory-mapped: the same
neighbours as an in-memory IVF with the same training; the memory budget picks the code."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from vrec_utils.index import ivf_ondisk
from vrec_utils.index.ivf_ondisk import OnDiskIvfIndex, build, plan_ivf, recall_at_k


def shards_of(ids, vectors, size):
    return [(ids[b : b + size], vectors[b : b + size]) for b in range(0, len(ids), size)]


@pytest.mark.parametrize("code_budget", ["SQ8", "PQ"])
def test_sharded_ondisk_ivf_equals_in_memory_ivf_with_the_same_training(real, tmp_path, code_budget):
    _, _, embeddings = real
    ids = np.asarray(embeddings.ids, dtype=str)
    vectors = np.ascontiguousarray(embeddings.vectors, dtype=np.float32)
    n, dim = vectors.shape
    sq8 = plan_ivf(n, dim, memory_budget=10**9, nlist=6, nprobe=2)
    pq8_bytes = n * (8 + ivf_ondisk.ID_BYTES) + 6 * dim * 4  # a budget that fits 8 bytes per vector, not 10
    plan = sq8 if code_budget == "SQ8" else plan_ivf(n, dim, memory_budget=pq8_bytes + n - 1, nlist=6, nprobe=2)
    assert plan.code == ("SQ8" if code_budget == "SQ8" else "PQ8")
    ondisk = build(plan, shards_of(ids, vectors, 70), tmp_path / "ivf", sample=vectors, workers=2)
    assert len(ondisk) == n and (tmp_path / "ivf" / "lists.ivfdata").stat().st_size > 0
    assert not list((tmp_path / "ivf").glob("shard-*.index"))  # merged, then removed
    # the in-memory twin: the very same trained index, all vectors added at once
    memory = faiss.read_index(str(tmp_path / "ivf" / ivf_ondisk.TRAINED))
    memory.add_with_ids(vectors, np.arange(n, dtype=np.int64))
    params = faiss.SearchParametersIVF(nprobe=2)
    want_scores, want_labels = memory.search(vectors[:50], 10, params=params)
    reopened = OnDiskIvfIndex.open(tmp_path / "ivf")
    got_scores, got_labels = reopened.search_labels(vectors[:50], 10)
    np.testing.assert_array_equal(got_labels, want_labels)
    np.testing.assert_array_equal(got_scores, want_scores)
    found_ids, _ = reopened.search(vectors[:50], 10)
    assert found_ids.tolist() == ids[want_labels].tolist()
    # lists are on disk, not in the index object: read memory-mapped
    assert isinstance(faiss.downcast_InvertedLists(faiss.extract_index_ivf(reopened.index).invlists), faiss.OnDiskInvertedLists)


def test_memory_budget_chooses_sq8_then_smaller_pq_codes():
    n, dim = 10_000_000, 256
    assert plan_ivf(n, dim, 4 * 2**30).code == "SQ8"  # 10M x (256 + 8) B = 2.6 GB
    pq = plan_ivf(n, dim, 2 * 2**30)
    assert pq.code.startswith("PQ") and pq.index_bytes(n) <= 2 * 2**30
    smaller = plan_ivf(n, dim, 2**30)
    assert smaller.code.startswith("PQ") and smaller.index_bytes(n) <= 2**30
    assert int(smaller.code[2:]) < int(pq.code[2:])  # less memory: fewer bytes per vector
    assert (pq.nlist, pq.coarse) == (16384, "hnsw32") and plan_ivf(100_000, dim, 2**40).coarse == "flat"
    with pytest.raises(ValueError, match="memory budget"):
        plan_ivf(n, dim, 10**6)


def test_recall_at_k_counts_shared_neighbours():
    exact = np.array([[0, 1, 2], [3, 4, -1]])
    assert recall_at_k(np.array([[2, 1, 0], [3, 9, -1]]), exact) == pytest.approx((1 + 0.5) / 2)
