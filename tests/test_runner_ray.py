"""`vrec extract --runner ray` on a local Ray cluster started here: the same cache as the local
runner, resumable after a killed driver, nothing lost or doubled after a killed worker, unreadable
images reported once. Without Ray, `--runner ray` fails fast with the install command."""

from __future__ import annotations

import builtins
import functools
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_extract import SmallConvEmbedder

from vrec_utils.catalog import load_catalog
from vrec_utils.cli import main
from vrec_utils.extract import extract_image_embeddings
from vrec_utils.store import VectorStore, catalog_keys

REPO = Path(__file__).resolve().parent.parent
N_IMAGES = 300


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    # Ray renices its workers to 15; on a machine shared with other jobs they would starve
    os.environ.setdefault("RAY_worker_niceness", "0")
    ray.init(
        num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024**2, log_to_driver=False,
        # workers import this checkout and the test helpers (the venv's editable install may be another checkout)
        runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}},
    )  # fmt: skip
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def catalog_dir(fashion_small_dir, tmp_path_factory) -> Path:
    """300 real fashion-small images, one of them truncated (unreadable)."""
    root = tmp_path_factory.mktemp("ray-catalog")
    styles = pd.read_csv(fashion_small_dir / "styles.csv", keep_default_na=False, dtype=str).head(N_IMAGES)
    styles.to_csv(root / "styles.csv", index=False)
    (root / "images").mkdir()
    for item in styles["id"]:
        shutil.copy(fashion_small_dir / "images" / f"{item}.jpg", root / "images" / f"{item}.jpg")
    broken = root / "images" / f"{styles['id'].iloc[7]}.jpg"
    broken.write_bytes(broken.read_bytes()[:200])
    return root


def ray_run(catalog, workdir, factory=SmallConvEmbedder, workers=1, fuse=None, **kwargs):
    from vrec_utils.runners import RayOptions, ray_runner

    runner = ray_runner(factory, RayOptions(workers=workers, threads_per_worker=1, fuse=fuse))
    return extract_image_embeddings(catalog, factory(), workdir, batch_size=32, chunk_size=64, precision="fp32", progress=False, runner=runner, **kwargs)


def stored_rows(result, catalog) -> tuple[int, int, int]:
    """(rows in the store, distinct content keys among them, distinct readable images of the
    catalog): fashion-small has byte-identical images, which share one vector."""
    view = VectorStore(Path(result.embeddings.manifest["store"])).view()
    keys = catalog_keys(result.cache_dir.parents[4], catalog)
    readable = set(keys.drop(result.skipped["id"]).tolist()) - {""}
    return len(view.keys), len(set(view.keys.tolist())), len(readable)


@pytest.mark.parametrize(
    "fuse, pipeline",
    [(None, "fused decode+embed in 2 CPU actor(s)"), (False, "decode in Ray CPU tasks, embed in 2 CPU actor(s)")],
    ids=["fused-cpu-default", "split-decode-tasks"],
)
def test_ray_runner_writes_the_local_runners_cache(ray_cluster, catalog_dir, tmp_path, capsys, fuse, pipeline):
    catalog = load_catalog(catalog_dir)
    local = extract_image_embeddings(catalog, SmallConvEmbedder(), tmp_path / "local", batch_size=32, chunk_size=64, num_workers=0, precision="fp32", progress=False)
    capsys.readouterr()
    ray = ray_run(catalog, tmp_path / "ray", workers=2, fuse=fuse)
    # the summary says which pipeline ran and why (GPU actors default to the split one)
    assert ray.runner == "ray" and ray.runner_reason.startswith(pipeline), ray.runner_reason
    assert f"runner: ray: {pipeline}" in ray.summary() and local.runner == "local" and "runner:" not in local.summary()
    broken = catalog.ids[7]
    # the same store folder name (model identity, precision, normalisation), vectors and coverage
    assert ray.cache_dir.relative_to(tmp_path / "ray") == local.cache_dir.relative_to(tmp_path / "local")
    assert ray.embeddings.ids.tolist() == local.embeddings.ids.tolist() == [i for i in catalog.ids if i != broken]
    np.testing.assert_array_equal(np.asarray(ray.embeddings.vectors), np.asarray(local.embeddings.vectors))
    for key in ("count", "complete", "missing", "unreadable", "precision", "normalized", "identity"):
        assert ray.embeddings.manifest[key] == local.embeddings.manifest[key], key
    # the unreadable image: reported once on stderr and once in skipped.csv, like the local runner
    assert ray.skipped["id"].tolist() == local.skipped["id"].tolist() == [broken]
    assert capsys.readouterr().err.count(f"skipped {broken}:") == 1
    rows, distinct, readable = stored_rows(ray, catalog)
    assert rows == distinct == readable
    # a later run (either runner) reuses everything
    again = extract_image_embeddings(catalog, SmallConvEmbedder(), tmp_path / "ray", num_workers=0, precision="fp32", progress=False)
    assert again.n_new == 0 and again.n_cached == N_IMAGES - 1


class KillOnceEmbedder(SmallConvEmbedder):
    """Kills its own worker process (SIGKILL, as the OOM killer or a lost node does) at its
    ``after``-th batch, once per ``marker`` file."""

    def __init__(self, marker: str, after: int) -> None:
        super().__init__()
        self.marker, self.after = marker, after

    def encode_image(self, pixels):
        out = super().encode_image(pixels)
        if self.batches_seen == self.after and not os.path.exists(self.marker):
            Path(self.marker).write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        return out


def test_a_killed_worker_is_retried_with_nothing_lost_or_doubled(ray_cluster, catalog_dir, tmp_path):
    catalog = load_catalog(catalog_dir)
    marker = tmp_path / "killed.pid"
    factory = functools.partial(KillOnceEmbedder, str(marker), 3)
    result = ray_run(catalog, tmp_path / "work", factory=factory)
    assert marker.exists(), "the worker was not killed: the test proves nothing"
    expected = extract_image_embeddings(catalog, SmallConvEmbedder(), tmp_path / "local", num_workers=0, precision="fp32", progress=False)
    assert result.n_new == expected.n_new and len(result.skipped) == 1
    assert result.embeddings.ids.tolist() == expected.embeddings.ids.tolist()
    np.testing.assert_array_equal(np.asarray(result.embeddings.vectors), np.asarray(expected.embeddings.vectors))
    rows, distinct, readable = stored_rows(result, catalog)
    assert rows == distinct == readable


@pytest.mark.slow  # a second driver process loads torch and the model: minutes on a busy 2-core machine
def test_a_killed_driver_resumes_with_only_the_missing_shards(ray_cluster, catalog_dir, tmp_path):
    workdir, limit = tmp_path / "work", 96
    command = [
        sys.executable, "-m", "vrec_utils.cli", "extract", "--catalog", str(catalog_dir), "--model", "efficientnet-lite0",
        "--device", "cpu", "--workdir", str(workdir), "--runner", "ray", "--ray-address", ray_cluster,
        "--precision", "fp32", "--chunk-size", "16", "--batch-size", "8", "--limit", str(limit),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    driver = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    chunks: list[Path] = []
    while time.monotonic() < deadline and driver.poll() is None:
        chunks = list(workdir.glob("embeddings/*/image-*/chunk-*.npz"))
        if len(chunks) >= 2:
            break
        time.sleep(0.1)
    assert driver.poll() is None, f"the driver ended before it could be killed: {driver.stderr.read().decode()[-2000:]}"
    assert chunks, "no chunk written within 240 s"
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    done = sum(len(np.load(p)["keys"]) for p in workdir.glob("embeddings/*/image-*/chunk-*.npz"))

    from vrec_utils.models import create_embedder
    from vrec_utils.runners import RayOptions, ray_runner

    factory = functools.partial(create_embedder, "efficientnet-lite0", device="cpu")
    catalog = load_catalog(catalog_dir)
    rerun = extract_image_embeddings(
        catalog, factory(), workdir, batch_size=8, chunk_size=16, precision="fp32", progress=False, limit=limit,
        runner=ray_runner(factory, RayOptions(threads_per_worker=1)),
    )  # fmt: skip
    # only what the killed run had not filed is embedded again
    rows, distinct, readable = stored_rows(rerun, catalog.head(limit))
    assert 0 < done < readable and rerun.n_new == readable - done
    assert len(rerun.embeddings) == limit - 1 and rows == distinct == readable


def test_runner_ray_without_ray_fails_fast_with_the_install_command(monkeypatch, capsys, sample_dir, tmp_path):
    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray" or name.startswith("ray."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    for name in [m for m in sys.modules if m == "ray" or m.startswith("ray.")]:
        monkeypatch.delitem(sys.modules, name)
    start = time.monotonic()
    code = main(["extract", "--catalog", str(sample_dir), "--model", "efficientnet-lite0", "--workdir", str(tmp_path), "--runner", "ray"])
    err = capsys.readouterr().err
    assert code == 2 and "pip install 'vrec[ray]'" in err and "ray[data]==" in err, err
    assert len(err.strip().splitlines()) == 1 and time.monotonic() - start < 10
    assert not (tmp_path / "embeddings").exists()  # failed before any work


def test_ray_flags_need_runner_ray(capsys, sample_dir, tmp_path):
    code = main(["extract", "--catalog", str(sample_dir), "--model", "efficientnet-lite0", "--workdir", str(tmp_path), "--gpus-per-worker", "1"])
    assert code == 2 and "--gpus-per-worker needs --runner ray" in capsys.readouterr().err


def test_ivf_shards_filled_in_ray_tasks_equal_a_threaded_build(ray_cluster, tmp_path):
    from vrec_utils.index.ivf_ondisk import build, plan_ivf

    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((2000, 32)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = np.asarray([f"item{i}" for i in range(len(vectors))])
    shards = [(ids[b : b + 500], vectors[b : b + 500]) for b in range(0, len(ids), 500)]
    plan = plan_ivf(len(vectors), 32, 10**9, nlist=16, nprobe=4)
    on_ray = build(plan, shards, tmp_path / "ray", sample=vectors, parallel="ray")
    threaded = build(plan, shards, tmp_path / "threads", sample=vectors, parallel="threads")
    a_ids, a_scores = on_ray.search(vectors[:100], 10)
    b_ids, b_scores = threaded.search(vectors[:100], 10)
    assert a_ids.tolist() == b_ids.tolist() and a_ids[:, 0].tolist() == ids[:100].tolist()
    np.testing.assert_array_equal(a_scores, b_scores)


def test_the_pipeline_defaults_to_fused_on_cpus_and_split_with_gpus():
    pytest.importorskip("ray")
    from vrec_utils.runners import RayOptions

    assert RayOptions().fused and "no GPU asked for" in RayOptions().describe()
    gpu = RayOptions(gpus_per_worker=1, workers=4)
    assert not gpu.fused and gpu.describe() == "decode in Ray CPU tasks, embed in 4 actor(s) with 1 GPU(s) each (GPU actors: decoding stays off the GPU's critical path)"
    assert RayOptions(gpus_per_worker=1, fuse=True).fused and not RayOptions(fuse=False).fused
