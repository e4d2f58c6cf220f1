"""The documented benchmark commands still run: each of the quick ones on the bundled sample with
tiny sizes, in its own process (as README's command runs it), from a folder outside the repo.

Benchmarks are not run by the rest of the suite, so an API change can break one unnoticed
(bench_cache.py crashed for a session when the engines started taking uint8 batches). These runs
check that each one ends and prints its headline; the numbers themselves belong to full runs.
bench_es.py runs with the live tests (on their node: ``es_live``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample"

# name: (arguments after the script, with {tmp} for the test's folder; lines its output must hold)
QUICK = {
    "bench_cache": (["--catalog", SAMPLE, "--repeats", "1"], ["warm rerun summary:", "embedded 0", "ratio (warm extract / load vectors):"]),
    "bench_evaluate": (["--catalog", SAMPLE, "--loop-queries", "10", "--n-bootstrap", "50"], ["per-query values identical on 10 of the 10"]),
    "bench_feature_maps": (["--catalog", SAMPLE, "--n", "32", "--repeats", "1", "--out", "{tmp}/fm"], ["maps identical: True"]),
    "bench_ivf_ondisk": (
        ["--catalog", SAMPLE, "--workdir", "{tmp}/ivf", "--items", "100", "--n", "5000", "--dim", "32", "--queries", "20", "--memory-budget-gb", "0.5"],
        ["(default): recall@10", "search process resident memory"],
    ),
    "bench_extract": (
        ["--catalog", SAMPLE, "--models", "efficientnet-lite0", "--engines", "torch", "--n", "32", "--forward-seconds", "0.5", "--rounds", "1", "--out", "{tmp}/extract.csv"],
        ["pipeline/forward", "saved"],
    ),
}  # fmt: skip


def _run(script: str, arguments: list, expected: list[str], tmp_path: Path, **env: str) -> None:
    command = [sys.executable, str(REPO / "benchmarks" / f"{script}.py")] + [str(a).format(tmp=tmp_path) for a in arguments]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg", **env}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{script} exited {done.returncode}:\n{output[-4000:]}"
    for line in expected:
        assert line in output, f"{script} did not print {line!r}:\n{output[-4000:]}"


@pytest.mark.parametrize("script", sorted(QUICK))
def test_quick_benchmark_runs_and_prints_its_headline(script, tmp_path):
    _run(script, *QUICK[script], tmp_path)


@pytest.mark.es_live
def test_elasticsearch_benchmark_runs_on_the_live_node(es_url, tmp_path):
    arguments = ["--catalog", SAMPLE, "--workdir", "{tmp}/work", "--n", "200", "--queries", "10", "--num-candidates", "10,50"]
    _run("bench_es", arguments, ["category-filtered kNN", "recall@10 vs filtered exact"], tmp_path, VREC_ES_URL=es_url)
