"""An in-process Elasticsearch node for tests: the real ``elasticsearch.Elasticsearch`` client wired
to it through ``node_class=``, so the exact HTTP requests the client sends are recorded and
answered (mappings, bulk, msearch with kNN and filters, counts, deletes) without a server."""

from __future__ import annotations

import json
from urllib.parse import parse_qs, urlsplit

import elasticsearch
import numpy as np
from elastic_transport import ApiResponseMeta, BaseNode, HttpHeaders
from elastic_transport._node import NodeApiResponse


class FakeElasticsearch:
    """A tiny in-memory Elasticsearch: the endpoints vrec uses, exact cosine kNN in numpy.

    Records every request as (method, path, query params, parsed body)."""

    def __init__(self, version: str = "9.1.0") -> None:
        self.version = version
        self.indices: dict[str, dict] = {}  # name -> {"mappings": ..., "docs": {id: source}}
        self.requests: list[tuple[str, str, dict, object]] = []
        self.fail_ids: dict[str, tuple[int, str]] = {}  # doc id -> (status, error type) on bulk
        self.throttle_once: set[str] = set()  # doc ids answered 429 the first time

    # -- transport ---------------------------------------------------------------------------
    def node_class(self):
        server = self

        class FakeNode(BaseNode):
            _CLIENT_META_HTTP_CLIENT = ("fake", "0")

            def perform_request(self, method, target, body=None, headers=None, request_timeout=None):
                status, payload = server.handle(method, target, body)
                meta = ApiResponseMeta(
                    status=status,
                    http_version="1.1",
                    headers=HttpHeaders({"x-elastic-product": "Elasticsearch", "content-type": "application/json"}),
                    duration=0.0,
                    node=self.config,
                )
                return NodeApiResponse(meta, b"" if method == "HEAD" else json.dumps(payload).encode())

        return FakeNode

    def client(self):
        return elasticsearch.Elasticsearch("http://fake-es:9200", node_class=self.node_class())

    def handle(self, method: str, target: str, raw: bytes | None):
        url = urlsplit(target)
        path = url.path
        params = {k: v[0] for k, v in parse_qs(url.query).items()}
        body = None
        if raw:
            text = raw.decode()
            lines = [json.loads(line) for line in text.splitlines() if line.strip()]
            body = lines if path.endswith(("_bulk", "_msearch")) else lines[0]
        self.requests.append((method, path, params, body))
        parts = [p for p in path.split("/") if p]
        if not parts:
            return 200, {"name": "fake", "version": {"number": self.version}, "tagline": "You Know, for Search"}
        if parts[0] == "_bulk":
            return 200, self._bulk(body)
        if parts[0] == "_msearch":
            return 200, self._msearch(body)
        name = parts[0]
        if len(parts) == 1:
            if method == "HEAD":
                return (200 if name in self.indices else 404), {}
            if method == "PUT":
                if name in self.indices:
                    return 400, {"error": {"type": "resource_already_exists_exception", "reason": "exists"}, "status": 400}
                self.indices[name] = {"mappings": json.loads(json.dumps(body["mappings"])), "docs": {}}
                return 200, {"acknowledged": True, "index": name}
            if method == "DELETE":
                self.indices.pop(name, None)
                return 200, {"acknowledged": True}
        if name not in self.indices:
            return 404, {"error": {"type": "index_not_found_exception", "reason": f"no such index [{name}]"}, "status": 404}
        index = self.indices[name]
        action = parts[1]
        if action == "_mapping" and method == "GET" and len(parts) == 4 and parts[2] == "field":
            return 200, self._field_mapping(name, parts[3], params.get("include_defaults") == "true")
        if action == "_mapping" and method == "GET":
            return 200, {name: {"mappings": index["mappings"]}}
        if action == "_mapping" and method == "PUT":
            index["mappings"]["properties"].update(body.get("properties", {}))
            if "_meta" in body:
                index["mappings"]["_meta"] = body["_meta"]
            return 200, {"acknowledged": True}
        if action == "_refresh":
            return 200, {"_shards": {"total": 1, "successful": 1, "failed": 0}}
        if action == "_count":
            return 200, {"count": sum(1 for _ in self._matching(index, body["query"]))}
        if action == "_search":
            hits = [{"_index": name, "_id": i, "_score": 0.0} for i in self._matching(index, body["query"])]
            return 200, {"hits": {"hits": hits[: body.get("size", 10)]}}
        return 400, {"error": {"type": "unsupported", "reason": f"fake ES does not do {method} {path}"}}

    def _field_mapping(self, name, field, include_defaults):
        """GET <index>/_mapping/field/<field>; with include_defaults, a vector field without
        index_options gets 9.1's default (bbq_hnsw from 384 dims, rescored x3; else int8_hnsw)."""
        spec = json.loads(json.dumps(self.indices[name]["mappings"]["properties"][field]))
        if include_defaults and spec.get("type") == "dense_vector" and "index_options" not in spec:
            big = spec["dims"] >= 384
            spec["index_options"] = {"type": "bbq_hnsw" if big else "int8_hnsw", "m": 16, "ef_construction": 100,
                                     **({"rescore_vector": {"oversample": 3.0}} if big else {})}
        return {name: {"mappings": {field: {"full_name": field, "mapping": {field: spec}}}}}

    # -- semantics ---------------------------------------------------------------------------
    def _matching(self, index, query):
        for doc_id, source in index["docs"].items():
            if _matches(doc_id, source, query):
                yield doc_id

    def _bulk(self, lines):
        items, errors = [], False
        i = 0
        while i < len(lines):
            header = lines[i]
            (op, meta), = header.items()
            body = lines[i + 1]
            i += 2
            doc_id, index = meta["_id"], self.indices[meta["_index"]]
            result = {"_index": meta["_index"], "_id": doc_id}
            if doc_id in self.throttle_once:
                self.throttle_once.discard(doc_id)
                items.append({op: {**result, "status": 429, "error": {"type": "es_rejected_execution_exception", "reason": "busy"}}})
                errors = True
                continue
            if doc_id in self.fail_ids:
                status, kind = self.fail_ids[doc_id]
                items.append({op: {**result, "status": status, "error": {"type": kind, "reason": "injected"}}})
                errors = True
                continue
            if not body.get("doc_as_upsert"):  # a partial update: null removes a field
                if doc_id not in index["docs"]:
                    items.append({op: {**result, "status": 404, "error": {"type": "document_missing_exception", "reason": "missing"}}})
                    errors = True
                    continue
                for field, value in body["doc"].items():
                    if value is None:
                        index["docs"][doc_id].pop(field, None)
                    else:
                        index["docs"][doc_id][field] = value
            else:
                problem = _check_doc(index["mappings"], body["doc"])
                if problem:
                    items.append({op: {**result, "status": 400, "error": {"type": "document_parsing_exception", "reason": problem}}})
                    errors = True
                    continue
                index["docs"].setdefault(doc_id, {}).update(body["doc"])
            items.append({op: {**result, "status": 200, "result": "updated"}})
        return {"took": 1, "errors": errors, "items": items}

    def _msearch(self, lines):
        responses = []
        for header, body in zip(lines[::2], lines[1::2]):
            index = self.indices[header["index"]]
            knn = body["knn"]
            query = np.asarray(knn["query_vector"], dtype=np.float64)
            candidates = []
            for doc_id, source in index["docs"].items():
                if knn["field"] not in source:
                    continue
                if "filter" in knn and not _matches(doc_id, source, knn["filter"]):
                    continue
                vec = np.asarray(source[knn["field"]], dtype=np.float64)
                cosine = float(vec @ query / (np.linalg.norm(vec) * np.linalg.norm(query)))
                candidates.append(((1.0 + cosine) / 2.0, doc_id))
            candidates.sort(key=lambda t: (-t[0], t[1]))
            hits = [{"_id": d, "_score": s} for s, d in candidates[: knn["k"]]][: body.get("size", 10)]
            responses.append({"took": 1, "hits": {"hits": hits}, "status": 200})
        return {"took": 1, "responses": responses}


def _matches(doc_id, source, query) -> bool:
    (kind, spec), = query.items()
    if kind == "match_all":
        return True
    if kind == "exists":
        return spec["field"] in source
    if kind == "ids":
        return doc_id in spec["values"]
    if kind == "term":
        (field, value), = spec.items()
        return source.get(field) == value
    if kind == "bool":
        return all(_matches(doc_id, source, q) for q in spec.get("filter", [])) and not any(
            _matches(doc_id, source, q) for q in spec.get("must_not", [])
        )
    raise AssertionError(f"fake ES does not know query {kind}")


def _check_doc(mappings, doc) -> str:
    properties = mappings["properties"]
    for field, value in doc.items():
        if field not in properties:
            return f"strict_dynamic_mapping_exception: [{field}] not allowed"
        if properties[field]["type"] == "dense_vector":
            if len(value) != properties[field]["dims"]:
                return f"dims mismatch for [{field}]"
            if not any(value):
                return "The [cosine] similarity does not support vectors with zero magnitude"
    return ""
