"""Where runs live and whether one is finished: train only when no up-to-date model exists."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from ..catalog import Catalog
from ..models.local import local_model_dir, local_model_name
from ..store import DEFAULT_WORKDIR, slugify
from .config import FinetuneConfig
from .loop import finetune


def default_run_dir(workdir: str | os.PathLike, catalog: Catalog, base: str, config: FinetuneConfig) -> Path:
    """``WORKDIR/finetune/<catalog>-<fingerprint>-<base>-<config digest>``: one folder per run identity."""
    return Path(workdir) / "finetune" / f"{slugify(catalog.name)}-{catalog.fingerprint()[:8]}-{slugify(base)}-{config.digest()[:10]}"


def find_finetuned(
    catalog: Catalog,
    workdir: str | os.PathLike = DEFAULT_WORKDIR,
    base: str = "mini-siglip",
    *,
    config: FinetuneConfig | None = None,
    out: str | os.PathLike | None = None,
) -> str | None:
    """The ``local:`` name of a finished run of ``base`` fine-tuned on ``catalog`` with ``config``,
    or None when there is none (nothing is trained)."""
    config = config or FinetuneConfig()
    out = Path(out) if out is not None else default_run_dir(workdir, catalog, base, config)
    out = out.expanduser().resolve()
    model_json = out / "model" / "vrec_model.json"
    if model_json.is_file():
        run = json.loads(model_json.read_text()).get("run", {})
        if (
            run.get("base") == base
            and run.get("catalog_fingerprint") == catalog.fingerprint()
            and run.get("config_digest") == config.digest()
        ):
            return local_model_name(out / "model")
    return None


def ensure_finetuned(
    catalog: Catalog,
    workdir: str | os.PathLike = DEFAULT_WORKDIR,
    base: str = "mini-siglip",
    *,
    config: FinetuneConfig | None = None,
    out: str | os.PathLike | None = None,
    device: str | torch.device | None = "auto",
    progress: bool = True,
    warm_start: str | os.PathLike | None = None,
) -> str:
    """The ``local:`` name of a model fine-tuned on ``catalog`` with ``config``; trains only when
    no finished run of the same base, catalog and config exists (fast when cached). ``warm_start``:
    a run folder whose finished training this run shares (see :func:`finetune`)."""
    config = config or FinetuneConfig()
    found = find_finetuned(catalog, workdir, base, config=config, out=out)
    if found is not None:
        return found
    out = (Path(out) if out is not None else default_run_dir(workdir, catalog, base, config)).expanduser().resolve()
    return finetune(catalog, base, out, workdir=workdir, config=config, device=device, progress=progress, warm_start=warm_start).model_name


def load_result(out: str | os.PathLike) -> dict[str, Any]:
    """``result.json``, ``history.csv``, ``steps.csv`` and ``alpha.csv`` of a finished run (its
    folder, its model folder, or the model's ``local:`` name)."""
    out = local_model_dir(str(out)) or Path(out)
    if (out / "vrec_model.json").is_file() and not (out / "result.json").is_file():
        out = out.parent
    if not (out / "result.json").is_file():
        raise FileNotFoundError(f"no finished fine-tuning run in {out} (result.json missing)")
    frames = {name: pd.read_csv(out / f"{name}.csv") for name in ("history", "steps", "alpha") if (out / f"{name}.csv").is_file()}
    return {"result": json.loads((out / "result.json").read_text()), **frames}
