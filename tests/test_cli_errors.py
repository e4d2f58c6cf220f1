"""The command line's failure contract (issue #10): every failure a user can meet prints ONE line
``vrec <cmd>: error: ...`` on stderr and exits 2, with no traceback unless --debug / VREC_DEBUG=1;
bugs print one line too (exit 1); no secret ever reaches the output; every refused catalog row is
named in skipped.csv.

The Elasticsearch failures are real: a closed loopback port (connection refused), an unresolvable
``.invalid`` host (DNS), and a tiny http.server on 127.0.0.1 answering 401/503/404.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import errno
import http.server
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pandas as pd
import pytest
import torch

from vrec_utils.cli import main
from vrec_utils.redact import redact_text, redact_url

REPO = Path(__file__).resolve().parent.parent
MODEL = "efficientnet-lite0"
SECRET = "pw-S3cr3t-9f2c"
N_REAL, N_ESCAPING = 6, 8


# ======================================================================================= fixtures


@pytest.fixture(scope="module")
def catalog_dir(tmp_path_factory, sample_catalog) -> Path:
    """6 real images and 8 rows whose image path leaves the catalog folder (refused)."""
    root = tmp_path_factory.mktemp("cat")
    (root / "images").mkdir()
    with open(root / "catalog.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "image", "articleType"])
        for item_id in sample_catalog.ids[:N_REAL]:
            shutil.copy(sample_catalog.image_path(item_id), root / "images" / f"{item_id}.jpg")
            writer.writerow([item_id, f"images/{item_id}.jpg", sample_catalog.items.at[item_id, "articleType"]])
        for i in range(N_ESCAPING):
            writer.writerow([f"esc{i}", f"../outside/{i}.jpg", "Tshirts"])
    return root


@pytest.fixture(scope="module")
def extracted(catalog_dir, tmp_path_factory) -> tuple[Path, str]:
    """A workdir whose cache holds the 6 readable items; (workdir, extract's stderr)."""
    workdir = tmp_path_factory.mktemp("work")
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        code = main(["extract", "--catalog", str(catalog_dir), "--model", MODEL, "--workdir", str(workdir), "--workers", "0", "--precision", "fp32"])
    assert code == 0, stderr.getvalue()
    return workdir, stderr.getvalue()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _StatusHandler(http.server.BaseHTTPRequestHandler):
    """Answers every request with the server's status and an Elasticsearch-like error body."""

    def _answer(self) -> None:
        status = self.server.status  # type: ignore[attr-defined]
        body = json.dumps({"error": {"type": "stub", "reason": f"stub {status}"}, "status": status}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_HEAD = do_POST = do_PUT = _answer

    def log_message(self, *args) -> None:  # quiet
        pass


@pytest.fixture(scope="module")
def es_stub():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _StatusHandler)
    server.status = 503  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _es_url(scenario: str, es_stub, credentials: str = "") -> str:
    """The VREC_ES_URL of a failure scenario (all on loopback, or a name that cannot resolve)."""
    userinfo = f"{credentials}@" if credentials else ""
    if scenario == "refused":
        return f"http://{userinfo}127.0.0.1:{_free_port()}"
    if scenario == "dns":
        return f"http://{userinfo}nohost.invalid:9200"
    es_stub.status = int(scenario)
    return f"http://{userinfo}127.0.0.1:{es_stub.server_address[1]}"


def _run(argv: list[str], capfd, monkeypatch, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    for var in ("VREC_ES_URL", "VREC_ES_API_KEY", "VREC_ES_USER", "VREC_ES_PASSWORD", "VREC_DEBUG"):
        monkeypatch.delenv(var, raising=False)
    for key, value in (env or {}).items():
        monkeypatch.setenv(key, value)
    capfd.readouterr()
    code = main(argv)
    out, err = capfd.readouterr()
    return code, out, err


def _run_subprocess(argv: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("VREC_")}
    full_env.update({"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})})
    return subprocess.run(
        [sys.executable, "-m", "vrec_utils.cli", *argv], capture_output=True, text=True, env=full_env, cwd=REPO, timeout=300
    )


# What a command may print on stderr before it fails: the catalog report and a (closed) progress bar.
_REPORT_PREFIXES = ("catalog: ", "embed ")


def _assert_one_line_error(code: int, err: str, command: str, *needles: str, alone: bool = True) -> str:
    """Exit 2, the error on exactly one (the last) line, no traceback. ``alone``: nothing else on
    stderr; else only the catalog report / progress bar before it."""
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2, err
    assert "Traceback" not in err
    assert lines and lines[-1].startswith(f"vrec {command}: error: "), err
    others = lines[:-1]
    assert not others if alone else all(line.lstrip("\r").startswith(_REPORT_PREFIXES) for line in others), err
    for needle in needles:
        assert needle in lines[-1], lines[-1]
    return lines[-1]


# ======================================================================================= arguments


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--limit", "-1"], "argument --limit: must be at least 1, got -1"),
        (["--limit", "0"], "argument --limit: must be at least 1, got 0"),
        (["--batch-size", "0"], "argument --batch-size: must be at least 1"),
        (["--workers", "-2"], "argument --workers: must be at least 0"),
        (["--chunk-size", "x"], "argument --chunk-size: expected a whole number, got 'x'"),
    ],
)
def test_bad_counts_are_refused_at_parsing(extra, needle, catalog_dir, tmp_path, capfd, monkeypatch):
    code, out, err = _run(["extract", "--catalog", str(catalog_dir), "--model", MODEL, "--workdir", str(tmp_path / "w"), *extra], capfd, monkeypatch)
    _assert_one_line_error(code, err, "extract", needle, "vrec extract --help")
    assert not (tmp_path / "w").exists()  # refused before anything ran


@pytest.mark.parametrize("command", [["recommend", "--item", "x"], ["search", "--text", "x"]])
def test_k_below_one_is_refused(command, catalog_dir, tmp_path, capfd, monkeypatch):
    code, _, err = _run([command[0], "--catalog", str(catalog_dir), "--model", MODEL, *command[1:], "-k", "0"], capfd, monkeypatch)
    _assert_one_line_error(code, err, command[0], "argument -k: must be at least 1, got 0")


def test_missing_argument_is_one_line_not_usage(capfd, monkeypatch):
    code, _, err = _run(["recommend", "--catalog", "x"], capfd, monkeypatch)
    _assert_one_line_error(code, err, "recommend", "required: --model, --item")


@pytest.mark.parametrize(
    "argv, command, flag",
    [
        (["extract", "--catalog", "{cat}", "--model", MODEL, "--workdir", "{file}"], "extract", "--workdir"),
        (["extract", "--catalog", "{cat}", "--model", MODEL, "--workdir", "{file}/sub/dir"], "extract", "--workdir"),
        (["finetune", "--catalog", "{cat}", "--out", "{file}"], "finetune", "--out"),
        (["data", "split", "--catalog", "{cat}", "--workdir", "{file}"], "data split", "--workdir"),
    ],
)
def test_a_file_given_as_folder_is_one_line(argv, command, flag, catalog_dir, tmp_path, capfd, monkeypatch):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    argv = [a.format(cat=catalog_dir, file=a_file) for a in argv]
    code, _, err = _run(argv, capfd, monkeypatch)
    _assert_one_line_error(code, err, command, f"argument {flag}:", f"{str(a_file)!r} is a file, not a folder")


# ======================================================================================= files, disk, devices


def test_disk_full_during_cache_write_is_one_line(catalog_dir, tmp_path, capfd, monkeypatch):
    from vrec_utils.store import EmbeddingCache

    def full(self, ids, vectors):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # like write() on a full disk: no file name

    monkeypatch.setattr(EmbeddingCache, "append", full)
    workdir = tmp_path / "w"
    code, _, err = _run(["extract", "--catalog", str(catalog_dir), "--model", MODEL, "--workdir", str(workdir), "--workers", "0", "--precision", "fp32", "--limit", "1"], capfd, monkeypatch)
    line = _assert_one_line_error(code, err, "extract", "no space left", "--workdir", str(workdir), "rerun resumes", alone=False)
    assert "Errno" not in line


def test_permission_denied_names_the_file_and_the_setting(catalog_dir, tmp_path, capfd, monkeypatch):
    from vrec_utils.store import EmbeddingCache

    workdir = tmp_path / "w"

    def denied(self, ids, vectors):
        raise PermissionError(errno.EACCES, "Permission denied", str(self.directory / "chunk-000000.npz"))

    monkeypatch.setattr(EmbeddingCache, "append", denied)
    code, _, err = _run(["extract", "--catalog", str(catalog_dir), "--model", MODEL, "--workdir", str(workdir), "--workers", "0", "--precision", "fp32", "--limit", "1"], capfd, monkeypatch)
    _assert_one_line_error(code, err, "extract", "permission denied on", "chunk-000000.npz", "point --workdir elsewhere", alone=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
@pytest.mark.parametrize("command", ["extract", "search", "finetune"])
def test_cuda_requested_without_gpu_is_refused_up_front(command, catalog_dir, tmp_path, capfd, monkeypatch):
    argv = {
        "extract": ["extract", "--catalog", str(catalog_dir), "--model", MODEL, "--workdir", str(tmp_path)],
        "search": ["search", "--catalog", str(catalog_dir), "--model", MODEL, "--text", "red", "--workdir", str(tmp_path)],
        "finetune": ["finetune", "--catalog", str(catalog_dir), "--out", str(tmp_path / "run"), "--workdir", str(tmp_path)],
    }[command]
    code, _, err = _run([*argv, "--device", "cuda"], capfd, monkeypatch)
    _assert_one_line_error(code, err, command, "--device cuda: no CUDA GPU is visible here", "--device cpu")
    assert not (tmp_path / "embeddings").exists() and not (tmp_path / "run").exists()


def test_unknown_device_is_one_line(catalog_dir, tmp_path, capfd, monkeypatch):
    code, _, err = _run(["extract", "--catalog", str(catalog_dir), "--model", MODEL, "--workdir", str(tmp_path), "--device", "gpu"], capfd, monkeypatch)
    _assert_one_line_error(code, err, "extract", "--device 'gpu': not a device")


# ======================================================================================= refused files


class _Untrusted:
    """Any class outside torch's weights_only allow-list: its pickle is what a hostile file holds."""


def _untrusted_pickle(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {"w": torch.zeros(2)}, "extra": argparse.Namespace(payload=_Untrusted())}, path)
    with pytest.raises(Exception, match="weights_only"):  # torch itself refuses it ...
        torch.load(io.BytesIO(path.read_bytes()), weights_only=True)
    return path


def _assert_refused_untrusted(code: int, err: str, command: str, path: Path, remedy: str) -> None:
    _assert_one_line_error(code, err, command, f"{str(path)!r} is not a trusted vrec checkpoint", remedy, alone=False)
    assert "weights_only" not in err  # ... but its advice to load it anyway never reaches the user


def test_untrusted_weights_file_is_refused_in_one_line(catalog_dir, tmp_path, capfd, monkeypatch):
    evil = _untrusted_pickle(tmp_path / "resnet50.pt")
    code, _, err = _run(["extract", "--catalog", str(catalog_dir), "--model", "resnet50", "--weights", str(evil), "--workdir", str(tmp_path)], capfd, monkeypatch)
    _assert_refused_untrusted(code, err, "extract", evil, "safetensors")


def test_untrusted_finetune_checkpoint_is_refused_and_no_resume_starts_over(catalog_dir, tmp_path, capfd, monkeypatch):
    out = tmp_path / "run"
    evil = _untrusted_pickle(out / "checkpoints" / "last.pt")
    code, _, err = _run(["finetune", "--catalog", str(catalog_dir), "--out", str(out), "--workdir", str(tmp_path)], capfd, monkeypatch)
    _assert_refused_untrusted(code, err, "finetune", evil, "--no-resume")
    # The way out the message gives works: --no-resume deletes the file without reading it.
    from vrec_utils.train.loop import _load_checkpoint

    assert _load_checkpoint(evil, {}, resume=False, overwrite=True) is None and not evil.exists()


def test_untrusted_local_model_is_refused_in_one_line(catalog_dir, tmp_path, capfd, monkeypatch):
    model_dir = tmp_path / "model"
    heads = _untrusted_pickle(model_dir / "heads.safetensors")  # a pickle posing as safetensors
    meta = {"format": "vrec-local-model", "version": 1, "family": "mini-siglip", "towers": {}, "dim": 1280, "alpha": 0.5,
            "heads": {"file": heads.name, "image_dim": 1280, "text_dim": 384}}  # fmt: skip
    (model_dir / "vrec_model.json").write_text(json.dumps(meta))
    code, _, err = _run(["extract", "--catalog", str(catalog_dir), "--model", f"local:{model_dir}", "--workdir", str(tmp_path)], capfd, monkeypatch)
    _assert_refused_untrusted(code, err, "extract", heads, "vrec finetune --out DIR")


# ======================================================================================= Elasticsearch


@pytest.mark.parametrize(
    "scenario, needle",
    [
        ("refused", "cannot reach Elasticsearch"),
        ("dns", "cannot reach Elasticsearch"),
        ("401", "refused the credentials (401)"),
        ("503", "is not ready (503"),
        ("404", "answered HTTP 404: not found: VREC_ES_URL must be the server's root address"),
    ],
)
def test_elasticsearch_failures_are_one_line(scenario, needle, extracted, catalog_dir, es_stub, capfd, monkeypatch):
    workdir, _ = extracted
    argv = ["index", "--catalog", str(catalog_dir), "--workdir", str(workdir), "--model", MODEL, "--backend", "elasticsearch"]
    code, _, err = _run(argv, capfd, monkeypatch, {"VREC_ES_URL": _es_url(scenario, es_stub)})
    _assert_one_line_error(code, err, "index", needle)


@pytest.mark.parametrize("scenario", ["refused", "dns", "401", "503", "404"])
@pytest.mark.parametrize("command", ["index", "recommend", "search"])
def test_no_secret_in_any_output(command, scenario, extracted, catalog_dir, sample_catalog, es_stub, capfd, caplog, monkeypatch):
    """The secret in VREC_ES_URL (and in VREC_ES_API_KEY) is in nothing the command prints, warns or logs."""
    workdir, _ = extracted
    base = ["--catalog", str(catalog_dir), "--workdir", str(workdir), "--model", MODEL, "--backend", "elasticsearch"]
    argv = {
        "index": ["index", *base],
        "recommend": ["recommend", *base, "--item", sample_catalog.ids[0]],
        "search": ["search", *base, "--image", str(sample_catalog.image_path(sample_catalog.ids[1]))],
    }[command]
    env = {"VREC_ES_URL": _es_url(scenario, es_stub, credentials=f"elastic:{SECRET}")}
    code, out, err = _run(argv, capfd, monkeypatch, env)
    everything = out + err + caplog.text
    assert code == 2 and "Traceback" not in everything, everything
    assert SECRET not in everything
    assert f"vrec {command}: error: " in err and "Elasticsearch at" in err.splitlines()[-1]  # failed at the server
    warning = next(line for line in err.splitlines() if "credentials over plain http to http://" in line)
    assert "@" not in warning  # the warning names the server, not the credentials

    api_key = f"key-{SECRET}"
    code, out, err = _run(argv, capfd, monkeypatch, {"VREC_ES_URL": _es_url(scenario, es_stub), "VREC_ES_API_KEY": api_key})
    assert code == 2 and api_key not in out + err + caplog.text and SECRET not in out + err + caplog.text


def test_secret_stays_out_of_a_real_process_output_even_with_debug(extracted, catalog_dir, es_stub):
    """Out of process: what a terminal shows (logging to stderr included); --debug adds the
    traceback, redacted too."""
    workdir, _ = extracted
    argv = ["index", "--catalog", str(catalog_dir), "--workdir", str(workdir), "--model", MODEL, "--backend", "elasticsearch"]
    env = {"VREC_ES_URL": _es_url("refused", es_stub, credentials=f"elastic:{SECRET}")}
    plain = _run_subprocess(argv, env)
    assert plain.returncode == 2 and SECRET not in plain.stdout + plain.stderr
    assert "Traceback" not in plain.stderr
    lines = plain.stderr.strip().splitlines()
    assert [line.split(": ")[1] for line in lines] == ["warning", "error"], plain.stderr  # plain-http warning + the error

    debug = _run_subprocess(["--debug", *argv], env)
    assert debug.returncode == 2 and SECRET not in debug.stdout + debug.stderr
    assert "Traceback (most recent call last)" in debug.stderr
    assert debug.stderr.strip().splitlines()[-1].startswith("vrec index: error: cannot reach Elasticsearch at http://127.0.0.1")


# ======================================================================================= --debug and bugs


@pytest.mark.parametrize("how", ["flag-before", "flag-after", "env"])
def test_debug_shows_the_traceback_then_the_line(how, extracted, catalog_dir, es_stub, capfd, monkeypatch):
    workdir, _ = extracted
    argv = ["index", "--catalog", str(catalog_dir), "--workdir", str(workdir), "--model", MODEL, "--backend", "elasticsearch"]
    env = {"VREC_ES_URL": _es_url("503", es_stub)}
    if how == "flag-before":
        argv = ["--debug", *argv]
    elif how == "flag-after":
        argv = [*argv, "--debug"]
    else:
        env["VREC_DEBUG"] = "1"
    code, _, err = _run(argv, capfd, monkeypatch, env)
    assert code == 2
    assert "Traceback (most recent call last)" in err and "ApiError" in err
    assert err.strip().splitlines()[-1].startswith("vrec index: error: Elasticsearch at http://127.0.0.1")


def test_a_bug_is_one_line_exit_1_pointing_at_debug(catalog_dir, tmp_path, capfd, monkeypatch):
    from vrec_utils.cli import extract_cmd

    def broken(*args, **kwargs):
        raise RuntimeError("internal invariant broken")

    monkeypatch.setattr(extract_cmd, "load_catalog", broken)
    argv = ["extract", "--catalog", str(catalog_dir), "--model", MODEL, "--workdir", str(tmp_path)]
    code, _, err = _run(argv, capfd, monkeypatch)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and "Traceback" not in err
    assert lines[0].startswith("vrec extract: error: unexpected RuntimeError: internal invariant broken")
    assert "run with --debug for the traceback" in lines[0]
    code, _, err = _run([*argv, "--debug"], capfd, monkeypatch)
    assert code == 1 and "Traceback (most recent call last)" in err and "internal invariant broken" in err


# ======================================================================================= refused catalog rows


def test_every_refused_catalog_row_is_in_skipped_csv(extracted, catalog_dir):
    workdir, stderr = extracted
    (skipped_csv,) = workdir.glob("embeddings/**/skipped.csv")
    skipped = pd.read_csv(skipped_csv, dtype=str, keep_default_na=False)
    refused = skipped[skipped["id"].str.startswith("esc")]
    assert sorted(refused["id"]) == [f"esc{i}" for i in range(N_ESCAPING)]  # all 8, not the 5 the summary shows
    for i, reason in zip(refused["id"].str[3:], refused["reason"]):
        assert reason == f"refused: image path '../outside/{i}.jpg' leaves the catalog folder"
    assert f"{N_ESCAPING} row(s) refused" in stderr and "(+3 more)" in stderr
    assert f"{N_ESCAPING} item(s) skipped, listed in {skipped_csv}" in stderr


# ======================================================================================= redaction helpers


@pytest.mark.parametrize(
    "url, expected",
    [
        ("http://elastic:pw@host:9200", "http://***@host:9200"),
        ("https://user:p%40ss@es.example:443/prefix", "https://***@es.example:443/prefix"),
        ("http://host:9200/?api_key=abc&x=1", "http://host:9200/?api_key=***&x=1"),
        ("elastic:pw@host:9200", "***@host:9200"),
        ("http://localhost:9200", "http://localhost:9200"),
    ],
)
def test_redact_url(url, expected):
    assert redact_url(url) == expected


def test_redact_text_masks_urls_inside_messages_and_known_secrets():
    text = "cannot reach http://u:pw@h:1 (see https://a:b@c/x?token=t1), key k-123"
    assert redact_text(text, ["k-123"]) == "cannot reach http://***@h:1 (see https://***@c/x?token=***), key ***"


def test_elasticsearch_messages_warnings_and_saved_settings_carry_no_credentials(es_stub):
    """At the source, not only at the command line's last line of defence."""
    from vrec_utils.index import BackendUnavailableError
    from vrec_utils.index.elasticsearch import ElasticsearchConfig, ElasticsearchIndex, connect

    for scenario in ("refused", "401"):
        config = ElasticsearchConfig(url=_es_url(scenario, es_stub, credentials=f"elastic:{SECRET}"))
        with pytest.warns(UserWarning, match=r"plain http to http://127\.0\.0\.1") as warned:
            with pytest.raises(BackendUnavailableError) as raised:
                connect(config)
        assert SECRET not in str(raised.value) and "http://127.0.0.1" in str(raised.value)
        assert all(SECRET not in str(w.message) for w in warned)
    with pytest.raises(ValueError) as raised:
        ElasticsearchConfig(url=f"elastic:{SECRET}@host:9200")  # no scheme: refused, still not echoed
    assert SECRET not in str(raised.value)
    index = ElasticsearchIndex.__new__(ElasticsearchIndex)  # only the fields _save/_describe read
    index.config, index.index_name, index.field, index.num_candidates = config, "i", "f", None
    index.vector_mapping = {"index_options": {}}
    assert SECRET not in json.dumps(index._save(Path("."))) + json.dumps(index._describe())


@pytest.mark.parametrize("command", ["evaluate", "decide"])
def test_an_empty_model_list_is_refused_at_parsing(command, catalog_dir, tmp_path, capfd, monkeypatch):
    code, _, err = _run([command, "--catalog", str(catalog_dir), "--models", " , ", "--workdir", str(tmp_path / "w")], capfd, monkeypatch)
    _assert_one_line_error(code, err, command, "argument --models: needs at least one model name")
    assert not (tmp_path / "w").exists()
