"""Image paths that are URIs: ``file://`` directly, ``s3://`` for real against a local S3
emulator (moto's server), ``gs://`` against fake-gcs-server (a Go program: scripts/test.sh
builds it and sets ``VREC_TEST_FAKE_GCS_SERVER``; without it the gs:// test skips), and the
fail-fast error of a protocol whose package is missing.

The S3 emulator: moto[server] (5.2.5) in this process when it imports here, else a ``moto_server``
executable (``VREC_TEST_MOTO_SERVER``, else scripts/test.sh's ``.venv-moto``, else on PATH)
started on a free port. moto needs botocore, which needs python-dateutil<3; constraints.txt pins 4.0.0, so here moto lives in its own
environment (``python -m venv /tmp/moto && /tmp/moto/bin/pip install 'moto[server]==5.2.5'``,
then ``VREC_TEST_MOTO_SERVER=/tmp/moto/bin/moto_server``). Without one the S3 tests skip.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from test_extract import SmallConvEmbedder

from vrec_utils import image_files
from vrec_utils.catalog import load_catalog
from vrec_utils.evaluation.candidates import duplicate_keys
from vrec_utils.extract import extract_image_embeddings
from vrec_utils.images import ImageLoadError, load_rgb
from vrec_utils.plots import image_grid

REPO = Path(__file__).resolve().parent.parent
N_IMAGES = 50
BUCKET = "vrec-test"


def write_catalog(root: Path, fashion_small_dir: Path, image_of, extra_rows=()) -> Path:
    """A generic catalog.csv of the first N_IMAGES fashion-small items, ``image_of(id)`` as image."""
    styles = pd.read_csv(fashion_small_dir / "styles.csv", keep_default_na=False, dtype=str).head(N_IMAGES)
    rows = [{"id": i, "image": image_of(i), "articleType": t} for i, t in zip(styles["id"], styles["articleType"])]
    root.mkdir(parents=True, exist_ok=True)
    pd.DataFrame([*rows, *extra_rows]).to_csv(root / "catalog.csv", index=False)
    return root / "catalog.csv"


@pytest.fixture(scope="module")
def local_copy(fashion_small_dir, tmp_path_factory) -> Path:
    """The N_IMAGES images in a folder of their own, with a catalog of local paths."""
    root = tmp_path_factory.mktemp("local-catalog")
    (root / "images").mkdir()
    csv = write_catalog(root, fashion_small_dir, lambda i: f"images/{i}.jpg")
    for item in pd.read_csv(csv, dtype=str)["id"]:
        shutil.copy(fashion_small_dir / "images" / f"{item}.jpg", root / "images" / f"{item}.jpg")
    return root


def extract(catalog, workdir, **kwargs):
    return extract_image_embeddings(catalog, SmallConvEmbedder(), workdir, batch_size=16, chunk_size=32, precision="fp32", progress=False, **kwargs)


# ------------------------------------------------------------------------------------ file://


def test_file_uris_give_the_same_pixels_vectors_and_keys_as_paths(local_copy, fashion_small_dir, tmp_path):
    root = local_copy
    uri_csv = write_catalog(root / "uri", fashion_small_dir, lambda i: (root / "images" / f"{i}.jpg").as_uri())
    # the file:// catalog lives in a sub-folder: its images are outside it, so it is refused ...
    refused = load_catalog(uri_csv)
    assert len(refused) == 0 and len(refused.report.escaping_paths) == N_IMAGES
    # ... and accepted from the catalog folder itself, the same rule as for local paths
    shutil.move(uri_csv, root / "uri.csv")
    by_uri, by_path = load_catalog(root / "uri.csv"), load_catalog(root / "catalog.csv")
    first = by_uri.ids[0]
    assert by_uri.image_path(first).startswith("file://") and by_uri.report.ok
    np.testing.assert_array_equal(np.asarray(load_rgb(by_uri.image_path(first))), np.asarray(load_rgb(by_path.image_path(first))))
    a, b = extract(by_uri, tmp_path / "uri", num_workers=1), extract(by_path, tmp_path / "path", num_workers=0)
    assert a.embeddings.ids.tolist() == b.embeddings.ids.tolist() == by_path.ids and a.skipped.empty
    np.testing.assert_array_equal(np.asarray(a.embeddings.vectors), np.asarray(b.embeddings.vectors))
    assert duplicate_keys(by_uri, by_uri.ids).tolist() == duplicate_keys(by_path, by_path.ids).tolist()


def test_a_missing_file_uri_is_an_image_load_error():
    with pytest.raises(ImageLoadError, match="object not found"):
        load_rgb((REPO / "no-such-image.jpg").as_uri())


# ------------------------------------------------------------------------------------ missing packages


def test_gs_without_gcsfs_or_pyarrow_fails_fast_naming_the_extra(monkeypatch, tmp_path, local_copy):
    monkeypatch.setitem(sys.modules, "gcsfs", None)  # `import gcsfs` raises ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.fs", None)
    image_files._filesystem.cache_clear()
    try:
        with pytest.raises(image_files.FilesystemUnavailableError, match=r"gs://.*pip install 'vrec\[cloud\]'"):
            load_rgb("gs://bucket/a.jpg")
        # extraction stops at once (a setup error), it does not skip every image one by one
        pd.DataFrame({"id": ["a"], "image": ["gs://bucket/a.jpg"]}).to_csv(tmp_path / "c.csv", index=False)
        with pytest.raises(image_files.FilesystemUnavailableError, match="vrec\\[cloud\\]"):
            extract(load_catalog(tmp_path / "c.csv"), tmp_path / "work", num_workers=0)
    finally:
        image_files._filesystem.cache_clear()


def test_an_unknown_protocol_is_named():
    with pytest.raises(image_files.FilesystemUnavailableError, match="nosuchfs://"):
        image_files.read_bytes("nosuchfs://x/y.jpg")


# ------------------------------------------------------------------------------------ s3:// on moto


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# the pinned moto that scripts/test.sh installs: taken before one on PATH, which may be another version
REPO_MOTO = Path(__file__).resolve().parents[1] / ".venv-moto" / "bin" / "moto_server"


@pytest.fixture(scope="module")
def s3_endpoint():
    """``http://127.0.0.1:PORT`` of a moto S3 server with AWS_* pointing at it (test credentials)."""
    pytest.importorskip("pyarrow.fs")
    port = _free_port()
    server = process = None
    try:
        from moto.server import ThreadedMotoServer  # moto[server] in this environment

        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
        server.start()
    except ImportError:
        command = os.environ.get("VREC_TEST_MOTO_SERVER") or (str(REPO_MOTO) if REPO_MOTO.is_file() else shutil.which("moto_server"))
        if not command:
            pytest.skip("no S3 emulator: install moto[server]==5.2.5 (its own venv, see this module's docstring) and set VREC_TEST_MOTO_SERVER")
        process = subprocess.Popen([command, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            break
        except OSError:
            time.sleep(0.1)
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_ENDPOINT_URL": endpoint, "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    image_files._filesystem.cache_clear()
    yield endpoint
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    image_files._filesystem.cache_clear()
    if server is not None:
        server.stop()
    if process is not None:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture(scope="module")
def s3_catalog(s3_endpoint, local_copy, fashion_small_dir, tmp_path_factory):
    """The N_IMAGES images uploaded to s3://vrec-test/images/, a catalog pointing at them, plus
    one row whose key does not exist."""
    import pyarrow.fs as pafs

    host = s3_endpoint.split("://", 1)[1]
    uploader = pafs.S3FileSystem(endpoint_override=host, scheme="http", region="us-east-1", allow_bucket_creation=True)
    uploader.create_dir(BUCKET)
    for path in sorted((local_copy / "images").iterdir()):
        with uploader.open_output_stream(f"{BUCKET}/images/{path.name}") as out:
            out.write(path.read_bytes())
    root = tmp_path_factory.mktemp("s3-catalog")
    missing = {"id": "missing-1", "image": f"s3://{BUCKET}/images/missing-1.jpg", "articleType": "Tshirts"}
    return load_catalog(write_catalog(root, fashion_small_dir, lambda i: f"s3://{BUCKET}/images/{i}.jpg", [missing]))


def assert_embeds_like_local_and_skips_once(remote_catalog, local_copy, tmp_path, capsys) -> list[str]:
    """The object-store catalog embeds to the local copy's vectors (forked DataLoader workers read
    the store too), its missing object is skipped and reported once, and a rerun digests from the
    memo (object versions), embeds nothing and reports the same skip. Returns the embedded ids."""
    local = extract(load_catalog(local_copy), tmp_path / "local", num_workers=0)
    capsys.readouterr()
    remote = extract(remote_catalog, tmp_path / "remote", num_workers=2)
    assert remote.embeddings.ids.tolist() == local.embeddings.ids.tolist()
    np.testing.assert_array_equal(np.asarray(remote.embeddings.vectors), np.asarray(local.embeddings.vectors))
    assert remote.skipped["id"].tolist() == ["missing-1"] and "object not found" in remote.skipped["reason"].iloc[0]
    assert capsys.readouterr().err.count("skipped missing-1:") == 1
    again = extract(remote_catalog, tmp_path / "remote", num_workers=0)
    assert again.n_new == 0 and again.skipped["id"].tolist() == ["missing-1"]
    return local.embeddings.ids.tolist()


def test_s3_images_embed_like_local_paths_and_a_missing_key_is_skipped_once(s3_catalog, local_copy, tmp_path, capsys):
    ids = assert_embeds_like_local_and_skips_once(s3_catalog, local_copy, tmp_path, capsys)
    # what else opens images by path: the duplicate keys of evaluation, thumbnails, search
    assert duplicate_keys(s3_catalog, ids).tolist() == duplicate_keys(load_catalog(local_copy), ids).tolist()
    np.testing.assert_array_equal(np.asarray(load_rgb(s3_catalog.image_path(ids[3]))), np.asarray(load_rgb(local_copy / "images" / f"{ids[3]}.jpg")))
    figure = image_grid(s3_catalog, ids[:4], ncols=4)  # the notebooks' grids: the S3 pixels, not the grey placeholder
    for ax, item in zip(figure.axes, ids[:4]):
        np.testing.assert_array_equal(np.asarray(ax.images[0].get_array()), np.asarray(load_rgb(local_copy / "images" / f"{item}.jpg")))
    plt.close(figure)


def test_s3_images_on_the_ray_runner(s3_catalog, local_copy, tmp_path, capsys):
    ray = pytest.importorskip("ray")
    from vrec_utils.runners import RayOptions, ray_runner

    os.environ.setdefault("RAY_worker_niceness", "0")
    aws = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    ray.init(
        num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024**2, log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]), **aws}},
    )  # fmt: skip
    try:
        local = extract(load_catalog(local_copy), tmp_path / "local", num_workers=0)
        capsys.readouterr()
        runner = ray_runner(SmallConvEmbedder, RayOptions(workers=1, threads_per_worker=1))
        remote = extract(s3_catalog, tmp_path / "ray", runner=runner)
    finally:
        ray.shutdown()
    assert remote.embeddings.ids.tolist() == local.embeddings.ids.tolist()
    np.testing.assert_array_equal(np.asarray(remote.embeddings.vectors), np.asarray(local.embeddings.vectors))
    assert remote.skipped["id"].tolist() == ["missing-1"]
    assert capsys.readouterr().err.count("skipped missing-1:") == 1


# ------------------------------------------------------------------------------------ gs:// on fake-gcs-server


@pytest.fixture(scope="module")
def gcs_catalog(local_copy, fashion_small_dir, tmp_path_factory):
    """fake-gcs-server (``VREC_TEST_FAKE_GCS_SERVER`` or on PATH; scripts/test.sh builds it with
    Go) serving the N_IMAGES images from gs://vrec-test/images/, STORAGE_EMULATOR_HOST pointing
    at it, and a catalog of gs:// URIs plus one row whose object does not exist."""
    pytest.importorskip("pyarrow.fs")
    command = os.environ.get("VREC_TEST_FAKE_GCS_SERVER") or shutil.which("fake-gcs-server")
    if not command or not os.access(command, os.X_OK):
        pytest.skip("no GCS emulator: scripts/test.sh builds fake-gcs-server with Go (go install github.com/fsouza/fake-gcs-server@v1.56.1) and sets VREC_TEST_FAKE_GCS_SERVER")
    data = tmp_path_factory.mktemp("gcs-data")
    shutil.copytree(local_copy / "images", data / BUCKET / "images")  # -data: one folder per bucket, loaded at start
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [command, "-scheme", "http", "-host", "127.0.0.1", "-port", str(port), "-public-host", f"127.0.0.1:{port}",
         "-backend", "memory", "-data", str(data), "-log-level", "error"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        for _ in range(200):
            try:
                urllib.request.urlopen(f"{endpoint}/storage/v1/b/{BUCKET}", timeout=1)
                break
            except OSError:
                if process.poll() is not None:
                    pytest.fail(f"fake-gcs-server exited with {process.returncode}")
                time.sleep(0.1)
        saved = os.environ.get("STORAGE_EMULATOR_HOST")
        os.environ["STORAGE_EMULATOR_HOST"] = endpoint
        image_files._filesystem.cache_clear()
        root = tmp_path_factory.mktemp("gcs-catalog")
        missing = {"id": "missing-1", "image": f"gs://{BUCKET}/images/missing-1.jpg", "articleType": "Tshirts"}
        yield load_catalog(write_catalog(root, fashion_small_dir, lambda i: f"gs://{BUCKET}/images/{i}.jpg", [missing]))
        if saved is None:
            os.environ.pop("STORAGE_EMULATOR_HOST", None)
        else:
            os.environ["STORAGE_EMULATOR_HOST"] = saved
        image_files._filesystem.cache_clear()
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_gs_images_embed_like_local_paths_and_a_missing_object_is_skipped_once(gcs_catalog, local_copy, tmp_path, capsys):
    ids = assert_embeds_like_local_and_skips_once(gcs_catalog, local_copy, tmp_path, capsys)
    assert image_files.read_bytes(gcs_catalog.image_path(ids[3])) == (local_copy / "images" / f"{ids[3]}.jpg").read_bytes()
