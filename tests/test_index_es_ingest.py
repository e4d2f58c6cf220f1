"""Parallel Elasticsearch ingestion from shards (in-process fake server): every document arrives,
failures are reported per shard, and the reader never runs more than max_in_flight shards ahead."""

from __future__ import annotations

import threading
import time

import numpy as np
import pandas as pd
import pytest
from fake_es import FakeElasticsearch

from vrec_utils.index.elasticsearch import ElasticsearchIndex
from vrec_utils.index.es_ingest import ingest_shards


def _shards(n_shards=8, size=25, dim=4):
    rng = np.random.default_rng(0)
    for s in range(n_shards):
        x = rng.standard_normal((size, dim)).astype(np.float32)
        ids = [f"s{s}-{i}" for i in range(size)]
        yield ids, x / np.linalg.norm(x, axis=1, keepdims=True), pd.DataFrame({"articleType": ["Tshirts"] * size}, index=ids)


def test_shards_are_ingested_in_parallel_with_back_pressure_and_per_shard_failures():
    fake = FakeElasticsearch()
    fake.fail_ids = {"s3-5": (400, "document_parsing_exception")}
    index = ElasticsearchIndex("m", 4, ["articleType"], client=fake.client(), index_name="vrec-test", bulk_backoff=0.01)
    lock, state = threading.Lock(), {"running": 0, "peak": 0, "done": 0}
    write = index.index_documents

    def slow_write(*args):
        with lock:
            state["running"] += 1
            state["peak"] = max(state["peak"], state["running"])
        time.sleep(0.05)
        try:
            return write(*args)
        finally:
            with lock:
                state["running"] -= 1
                state["done"] += 1

    index.index_documents = slow_write
    ahead = []

    def reader():
        for produced, shard in enumerate(_shards(), start=1):
            ahead.append(produced - state["done"])
            yield shard

    report = ingest_shards(index, reader(), writers=3, max_in_flight=3)
    assert report["shard"].tolist() == list(range(8)) and report["documents"].sum() == 200
    assert report["indexed"].sum() == 199 and report.loc[3, "failed"] == 1 and report["failed"].sum() == 1
    assert "s3-5: 400 document_parsing_exception" in report.loc[3, "errors"]
    assert len(fake.indices["vrec-test"]["docs"]) == 199
    assert state["peak"] > 1  # writers ran in parallel
    assert max(ahead) <= 3 + 1  # the reader waited for a free slot (the shard being handed over counts)


def test_a_shard_that_fails_as_a_whole_is_reported_and_the_others_go_on():
    fake = FakeElasticsearch()
    index = ElasticsearchIndex("m", 4, ["articleType"], client=fake.client(), index_name="vrec-test", bulk_backoff=0.01)
    shards = list(_shards(3))
    bad_ids, bad_vectors, meta = shards[1]
    shards[1] = (bad_ids, bad_vectors[:, :3], meta)  # wrong dimension: refused before any request
    report = ingest_shards(index, shards, writers=2)
    assert report["failed"].tolist() == [0, 25, 0] and report["indexed"].tolist() == [25, 0, 25]
    assert "dimension" in report.loc[1, "errors"] or "dim" in report.loc[1, "errors"]
    with pytest.raises(ValueError, match="writers"):
        ingest_shards(index, shards, writers=0)
