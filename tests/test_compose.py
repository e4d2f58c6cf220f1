"""docker-compose.yml's Elasticsearch health check, run by the same shell docker would use."""

from __future__ import annotations

import shutil
import socket
import subprocess
from pathlib import Path

import pytest
import yaml

COMPOSE = Path(__file__).resolve().parent.parent / "docker-compose.yml"


def _health_command(host_port: str) -> str:
    test = yaml.safe_load(COMPOSE.read_text())["services"]["elasticsearch"]["healthcheck"]["test"]
    assert test[0] == "CMD-SHELL"
    assert "localhost:9200" in test[1]
    return test[1].replace("localhost:9200", host_port)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_health_check_fails_without_a_server():
    """An unquoted `&` in the URL backgrounded curl and the check passed with no server at all."""
    done = subprocess.run(["sh", "-c", _health_command(f"127.0.0.1:{_free_port()}")], capture_output=True, timeout=30)
    assert done.returncode != 0


@pytest.mark.es_live
@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_health_check_passes_on_a_live_node(es_url):
    host_port = es_url.split("://", 1)[1].rstrip("/")
    done = subprocess.run(["sh", "-c", _health_command(host_port)], capture_output=True, timeout=30)
    assert done.returncode == 0, done.stderr
