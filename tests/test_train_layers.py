"""Training sits below evaluation: importing it loads no evaluation, search, index or study module."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ABOVE_TRAINING = ("vrec_utils.evaluate", "vrec_utils.search", "vrec_utils.index", "vrec_utils.studies", "vrec_utils.profiles")


def test_training_imports_nothing_above_it():
    code = "import json, sys, vrec_utils.train; print(json.dumps(sorted(sys.modules)))"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env, cwd=REPO).stdout
    loaded = json.loads(out)
    assert "vrec_utils.train.loop" in loaded
    assert [m for m in loaded if m.startswith(ABOVE_TRAINING)] == []
