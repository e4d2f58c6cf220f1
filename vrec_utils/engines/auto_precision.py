"""``--precision auto`` on a CPU: the fastest precision that keeps min cosine >= 0.999 to torch fp32,
measured on this CPU for this model and engine, once.

A fixed rule was wrong on one of the two CPU kinds either way: on a Xeon with AVX512-BF16 but no
AMX, bf16 ran slower than fp32 in torch (ResNet50 traced bf16 18.6 img/s vs OpenVINO f32 35.5) and
in OpenVINO (bf16 hint 20.6 vs f32 35.7), while on an AMD EPYC with AVX512-BF16 OpenVINO's bf16 was
1.3-1.9x faster. So ``auto`` times a few forward calls of each candidate (fp32, and bf16 where the
CPU has it) on the run's check inputs, after export/trace and warm-up, interleaved so that load
from other processes falls on both alike, and keeps the fastest one whose min cosine to torch fp32
meets :data:`F32_BAR`; bf16 must also be :data:`MIN_GAIN` faster, because fp32 is the exact one.

The decision is kept on disk under ``<cache_root>/engines/precision/`` (beside the compiled
models: another catalog in the same workdir finds it), keyed by the CPU (model name and flags),
the model's identity, the engine and its version and the check batch's shape, and written into
the store's manifest with the numbers it was made on. GPUs keep the fixed rule
(:func:`~vrec_utils.engines.torch_engine.resolve_precision`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..images import model_pixels
from ..models.base import Embedder
from ..store import slugify
from .openvino_engine import F32_BAR, ExportError
from .torch_engine import cpu_flags, cpu_model

#: how much faster bf16 must run than fp32 to be chosen (timings under load wobble by a few %)
MIN_GAIN = 1.05
#: a frozen torch trace is optimised over its first calls: time after them
WARMUPS, REPEATS, TIMED_IMAGES = 2, 2, 8
#: shown in the record; all flags are in the key
BF16_FLAGS = {"avx512_bf16", "amx_bf16", "amx_tile", "avx512_fp16", "avx_vnni", "avx512_vnni"}


@dataclass(frozen=True)
class Measurement:
    """One candidate precision: the best of the timed calls on the check batch, and its min cosine
    to torch fp32 there (NaN where the candidate failed to build, with ``error`` saying why)."""

    seconds: float
    min_cosine: float
    images: int = 0
    error: str = ""

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else float("nan")


def measure(
    engines: Mapping[str, Any], pixels: torch.Tensor, reference: torch.Tensor, *, warmups: int = WARMUPS, repeats: int = REPEATS,
    clock: Callable[[], float] = time.perf_counter, exact: str | None = None, known: Mapping[str, float] | None = None,
) -> dict[str, Measurement]:  # fmt: skip
    """Each candidate's min cosine to ``reference`` (torch fp32) on all of ``pixels``, and its time
    for ``engine.encode_images`` on the first :data:`TIMED_IMAGES` (best of ``repeats``, rounds
    interleaved, after ``warmups`` calls). ``exact``: the candidate that computed ``reference``
    (torch fp32 itself: cosine 1 without running it on all of ``pixels`` again); ``known``: cosines
    already measured on these ``pixels`` against this ``reference`` (an engine's compile check)."""
    timed = pixels[:TIMED_IMAGES]
    cosines = dict(known or {})
    for name, engine in engines.items():
        if name == exact:
            cosines[name] = 1.0
        elif name not in cosines:
            out = engine.encode_images(pixels)
            cosines[name] = torch.nn.functional.cosine_similarity(out.float(), reference.float()).min().item()
        for _ in range(warmups):
            engine.encode_images(timed)
    best = dict.fromkeys(engines, float("inf"))
    for _ in range(max(1, repeats)):
        for name, engine in engines.items():
            start = clock()
            engine.encode_images(timed)
            best[name] = min(best[name], clock() - start)
    return {name: Measurement(best[name], cosines[name], len(timed)) for name in engines}


def pick(measured: Mapping[str, Measurement], bar: float = F32_BAR, gain: float = MIN_GAIN) -> tuple[str, str]:
    """(precision, one-line reason) from the candidates' measurements: bf16 where it meets the
    cosine ``bar`` and runs at least ``gain`` times as fast as fp32, fp32 otherwise."""
    fp32, bf16 = measured["fp32"], measured.get("bf16")
    if bf16 is None:
        return "fp32", "auto: fp32 (this CPU has no bf16)"
    if bf16.error:
        return "fp32", f"auto: fp32 (bf16 failed: {bf16.error})"
    speed = fp32.seconds / bf16.seconds if bf16.seconds > 0 else float("inf")
    if not bf16.min_cosine >= bar:
        return "fp32", f"auto: fp32 (bf16 {speed:.2f}x as fast here but min cosine {bf16.min_cosine:.4f} < {bar})"
    if speed < gain:
        return "fp32", f"auto: fp32 (bf16 {speed:.2f}x as fast here, min cosine {bf16.min_cosine:.5f})"
    return "bf16", f"auto: bf16 ({speed:.2f}x fp32, min cosine {bf16.min_cosine:.5f})"


def decision_path(cache_root: str | os.PathLike, embedder: Embedder, engine: str, version: str, shape: tuple[int, ...]) -> tuple[Path, dict]:
    """Where the decision for this CPU, model, engine (and version) and check-batch shape lives."""
    fields = {
        "cpu": cpu_model(), "cpu_flags": hashlib.sha256(" ".join(sorted(cpu_flags())).encode()).hexdigest()[:16],
        "bf16_flags": sorted(cpu_flags() & BF16_FLAGS), "identity": embedder.identity(), "engine": engine,
        "engine_version": version, "batch_shape": list(shape),
    }  # fmt: skip
    key = hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return Path(cache_root) / "engines" / "precision" / f"{slugify(embedder.name)}-{engine}-{key}.json", fields


def read_decision(path: Path) -> dict | None:
    """A decision made earlier, or None (no file, or one this version cannot read: measure again)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("precision") in ("fp32", "bf16") else None


def write_decision(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(prefix=".decision-", dir=path.parent)
    with os.fdopen(handle, "w") as out:
        json.dump(record, out, indent=1, sort_keys=True, default=str)
    os.replace(staging, path)  # atomic: a reader sees a whole decision or none


def decide(
    build: Callable[..., Any], candidates: list[str], embedder: Embedder, pixels: torch.Tensor, *, engine: str, version: str,
    cache_root: str | os.PathLike, exact: str | None = None,
) -> tuple[Any, dict]:  # fmt: skip
    """The engine for ``auto`` and the decision record (``precision``, ``reason``, the measured
    ``candidates``, ``cached``): read from the decision file, or measured now and written there.
    ``build(precision, check, reference)`` makes an engine checked on ``check`` (torch fp32 gave
    ``reference`` there, None: compute it); fp32's failures propagate, bf16's count as a loss. A
    decision read from disk builds with the first :data:`TIMED_IMAGES` checked, as a plain run.
    ``exact``: the candidate that is torch fp32 itself (see :func:`measure`)."""
    path, fields = decision_path(cache_root, embedder, engine, version, tuple(pixels.shape))
    if len(candidates) == 1:
        return build("fp32", pixels[:TIMED_IMAGES], None), {"precision": "fp32", "reason": "auto: fp32 (this CPU has no bf16)", "cached": False}
    earlier = read_decision(path)
    if earlier is not None:
        return _reused(build, earlier, embedder, pixels[:TIMED_IMAGES], path)
    reference = fp32_reference(embedder, pixels)
    built, failed = {}, {}
    for precision in candidates:
        try:
            built[precision] = build(precision, pixels, reference)
        except ExportError as exc:
            if precision == "fp32":
                raise
            failed[precision] = Measurement(float("nan"), float("nan"), len(pixels), str(exc))
    # an engine that checked itself on these pixels against this reference (OpenVINO) need not run them again
    checked = {name: e.check_cosine for name, e in built.items() if not math.isnan(getattr(e, "check_cosine", math.nan))}
    measured = {**measure(built, pixels, reference, exact=exact, known=checked), **failed}
    precision, reason = pick(measured)
    record = {
        "precision": precision, "reason": reason, "key": fields, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "candidates": {name: _finite({**asdict(m), "images_per_second": m.images_per_second}) for name, m in measured.items()},
    }  # fmt: skip
    write_decision(path, record)
    return built[precision], {**record, "cached": False, "file": str(path)}


def _reused(build: Callable[..., Any], earlier: dict, embedder: Embedder, pixels: torch.Tensor, path: Path) -> tuple[Any, dict]:
    """The engine of a decision read from disk. A bf16 decision was measured on another catalog's
    images, so it must keep :data:`F32_BAR` on this run's ``pixels`` too; fp32 runs where it does not."""
    record = {**earlier, "cached": True, "file": str(path)}
    engine = build(earlier["precision"], pixels, None)
    if earlier["precision"] == "fp32":
        return engine, record
    cosine = getattr(engine, "check_cosine", float("nan"))  # an engine that checked itself on pixels (OpenVINO)
    if cosine != cosine:
        cosine = min_cosine_to_fp32(engine, embedder, pixels)
    if cosine >= F32_BAR:
        return engine, record
    reason = f"auto: fp32 (bf16 min cosine {cosine:.4f} < {F32_BAR} on this run's images)"
    return build("fp32", pixels, None), {**record, "precision": "fp32", "reason": reason}


def fp32_reference(embedder: Embedder, pixels: torch.Tensor) -> torch.Tensor:
    """Torch fp32's vectors for ``pixels`` (either form of :func:`~vrec_utils.images.pixel_batch`)."""
    with torch.inference_mode():
        return embedder.encode_image(model_pixels(pixels, embedder.image_transform).to(embedder.device)).float().cpu()


def min_cosine_to_fp32(engine: Any, embedder: Embedder, pixels: torch.Tensor) -> float:
    """The lowest cosine between ``engine``'s vectors and torch fp32's on ``pixels``."""
    return torch.nn.functional.cosine_similarity(engine.encode_images(pixels).float().cpu(), fp32_reference(embedder, pixels)).min().item()


def _finite(fields: dict) -> dict:
    """NaN (a candidate that failed to build) as null: the record is strict JSON."""
    return {k: None if isinstance(v, float) and v != v else v for k, v in fields.items()}


def decision_line(record: dict) -> str:
    """The decision's reason, saying whether it was measured in this run or read from an earlier one."""
    if not record.get("candidates"):
        return record["reason"]
    return record["reason"] + ("; measured earlier on this CPU" if record.get("cached") else "; measured now on this CPU")
