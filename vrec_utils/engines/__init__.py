"""Inference engines that run an embedder's towers: ``torch`` (always there) and ``openvino``
(optional extra, CPUs). :func:`select_engine` (images) and :func:`select_text_engine` (texts)
pick one and say why in one line.

Precision ``auto`` for images on a CPU is measured, not assumed (:mod:`.auto_precision`): the
fastest of fp32 and bf16 (where the CPU has bf16) that keeps min cosine 0.999 to torch fp32 on
the run's check inputs, timed for this model and engine on this CPU once and kept on disk. The
rule it replaces was wrong on one CPU kind either way: on the Xeon measured (avx512_bf16, no AMX)
bf16 ran slower than fp32 in torch and in OpenVINO, on an AMD EPYC OpenVINO's bf16 ran 1.3-1.9x
faster; and OpenVINO's bf16 hint missed the bar on real efficientnet-lite0 weights (min cosine
0.982 on 1,024 fashion-small images; torch's own bf16: 0.984), so there auto stays fp32 anyway
(benchmarks/bench_engine_precision.py). Explicit ``fp32``/``bf16`` run as asked; under the bf16
hint the engine's reason states the min cosine to torch fp32 on the run's check inputs. On a GPU
``auto`` keeps the fixed rule (bf16 where native). Text towers keep the fixed rule too.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from ..images import pixel_batch
from ..models.base import Embedder, ModelUnavailableError
from .auto_precision import decide, decision_line
from .openvino_engine import F32_BAR, INSTALL, ExportError, OpenVINOEngine, OpenVINOTextEngine, inference_precision, openvino_module
from .torch_engine import PRECISIONS, TorchEngine, TorchTextEngine, autocast_context, bf16_is_native, resolve_precision

ENGINES = ("auto", "torch", "openvino")


def select_engine(
    name: str, embedder: Embedder, precision: str, cache_root: str | Path, check: torch.Tensor | None = None
) -> TorchEngine | OpenVINOEngine:
    """The engine ``name`` asks for to run the image tower, ready; ``engine.reason`` is one line
    saying why it runs. ``check``: real model inputs (a few images through ``image_transform``)
    the OpenVINO compile is checked on against torch fp32 (seeded noise when None).

    ``auto``: OpenVINO on a CPU when it is installed and the model exports, torch otherwise.
    ``openvino``: fails at once (with the install command) when the extra is missing or the model
    is not on the CPU; a model that does not export runs on torch, and the reason says so.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    why_torch = _why_torch(name, embedder)
    if why_torch is None and (embedder.has_output_mix or not embedder.has_image):
        why_torch = f"torch: OpenVINO export of {embedder.name}'s image tower is not supported"
    measured = precision == "auto" and embedder.device.type == "cpu"
    # what precision auto measures on (an explicit precision needs no example, nor a transform)
    pixels = (check if check is not None and len(check) else example_batch(embedder, raw=True)) if measured else None
    if why_torch is None:
        try:
            if not measured:
                engine = OpenVINOEngine(embedder, openvino_precision(precision), example_batch(embedder), Path(cache_root), "", check)
            else:
                engine = _auto_openvino(embedder, Path(cache_root), pixels)
        except ExportError as exc:
            why_torch = f"torch: {embedder.name} did not export to OpenVINO ({exc}); fell back to torch"
        else:
            engine.reason = _openvino_reason(name, precision, engine)
            return engine
    if not measured:
        return TorchEngine(embedder, resolve_precision(precision, embedder.device), why_torch)
    candidates = ["fp32", "bf16"] if bf16_is_native(embedder.device) else ["fp32"]
    engine, record = decide(
        lambda p, check, reference: TorchEngine(embedder, p, why_torch), candidates, embedder, pixels, engine="torch", version=torch.__version__, cache_root=cache_root,
        exact="fp32",
    )  # fmt: skip
    engine.precision_choice = record
    engine.reason = f"{why_torch}; {decision_line(record)}"
    return engine


def _auto_openvino(embedder: Embedder, cache_root: Path, pixels: torch.Tensor) -> OpenVINOEngine:
    """The OpenVINO engine for precision ``auto``: f32 or the bf16 hint, whichever
    :func:`~.auto_precision.decide` measures (or measured earlier) as the faster within the bar."""
    ov = openvino_module()
    candidates = ["fp32", "bf16"] if inference_precision(ov, "bf16") == "bf16" else ["fp32"]
    example = example_batch(embedder)

    def build(precision: str, check: torch.Tensor, reference: torch.Tensor | None) -> OpenVINOEngine:
        return OpenVINOEngine(embedder, precision, example, cache_root, "", check, reference)

    version = f"{ov.__version__}, {OpenVINOEngine.performance}"  # timings made under another hint do not count
    engine, record = decide(build, candidates, embedder, pixels, engine="openvino", version=version, cache_root=cache_root)
    engine.precision_choice = record
    return engine


def select_text_engine(
    name: str, embedder: Embedder, precision: str, cache_root: str | Path, check: Sequence[str] | None = None
) -> TorchTextEngine | OpenVINOTextEngine:
    """:func:`select_engine` for the text tower (token ids -> vectors; the tokenizer runs in
    Python): OpenVINO for models with ``has_token_path`` (SigLIP, open_clip, MiniLM, mini-SigLIP,
    their fine-tunes); ``check``: real texts the compile is checked on."""
    torch_precision = resolve_precision(precision, embedder.device)
    why_torch = _why_torch(name, embedder)
    if why_torch is None and not (embedder.has_text and embedder.has_token_path):
        why_torch = f"torch: OpenVINO export of {embedder.name}'s text tower is not supported"
    if why_torch is not None:
        return TorchTextEngine(embedder, torch_precision, why_torch)
    try:
        engine = OpenVINOTextEngine(embedder, openvino_precision(precision), Path(cache_root), "", check)
    except ExportError as exc:
        return TorchTextEngine(embedder, torch_precision, f"torch: {embedder.name}'s text tower did not export to OpenVINO ({exc}); fell back to torch")
    engine.reason = _openvino_reason(name, precision, engine)
    return engine


def openvino_precision(precision: str) -> str:
    """The precision OpenVINO runs for a requested one: bf16 only when asked for (see the module)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return "bf16" if precision == "bf16" else "fp32"


def _why_torch(name: str, embedder: Embedder) -> str | None:
    """Why torch runs instead of OpenVINO (None: try OpenVINO); raises where ``--engine openvino``
    cannot be had at all."""
    if name not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {name!r}")
    if name == "torch":
        return "torch: --engine torch (the default)"
    installed = openvino_module() is not None
    if name == "openvino":
        if not installed:
            raise ModelUnavailableError(f"--engine openvino: OpenVINO is not installed; {INSTALL}")
        if embedder.device.type != "cpu":
            raise ValueError(f"--engine openvino runs on the CPU; the model is on {embedder.device} (use --device cpu)")
        return None
    if not installed:
        return f"torch: OpenVINO is not installed ({INSTALL} for the faster CPU engine)"
    if embedder.device.type != "cpu":
        return f"torch: the model is on {embedder.device}, OpenVINO here runs on the CPU"
    return None


def _openvino_reason(name: str, precision: str, engine: OpenVINOEngine | OpenVINOTextEngine) -> str:
    why = "asked for" if name == "openvino" else "auto, CPU with OpenVINO installed"
    if engine.hint == "bf16":
        bar = "within" if engine.check_cosine >= F32_BAR else "below"
        asked = decision_line(engine.precision_choice) if engine.precision_choice else "asked for, or the catalog's precision"
        why += f"; bf16 ({asked}): min cosine {engine.check_cosine:.4f} to torch fp32 on the check inputs ({bar} the {F32_BAR} bar)"
    elif precision == "bf16":
        why += "; f32: this CPU has no bf16"
    elif precision == "auto" and engine.precision_choice:
        why += f"; {decision_line(engine.precision_choice)}"
    how = "compiled model reused" if engine.reused else "exported and compiled"
    return f"openvino {engine.hint}: {why}; {how} in {engine.directory}"


def example_batch(embedder: Embedder, batch: int = 2, raw: bool = False) -> torch.Tensor:
    """A seeded noise batch in the shape ``embedder.image_transform`` makes (export and checks);
    ``raw``: in the form engines take (:func:`~vrec_utils.images.pixel_batch`)."""
    rng = torch.Generator().manual_seed(0)
    noise = [Image.fromarray(image) for image in torch.randint(0, 256, (batch, 96, 128, 3), dtype=torch.uint8, generator=rng).numpy()]
    return pixel_batch(noise, embedder.image_transform) if raw else torch.stack([embedder.image_transform(image) for image in noise])


__all__ = [
    "ENGINES", "PRECISIONS", "ExportError", "OpenVINOEngine", "OpenVINOTextEngine", "TorchEngine", "TorchTextEngine",
    "autocast_context", "bf16_is_native", "openvino_precision", "resolve_precision", "select_engine", "select_text_engine",
]  # fmt: skip
