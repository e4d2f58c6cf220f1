"""Inference engines that run an embedder's image tower: ``torch`` (always there) and
``openvino`` (optional extra, CPUs). :func:`select_engine` picks one and says why in one line."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from ..models.base import Embedder, ModelUnavailableError
from .openvino_engine import INSTALL, ExportError, OpenVINOEngine, openvino_module
from .torch_engine import PRECISIONS, TorchEngine, autocast_context, bf16_is_native, resolve_precision

ENGINES = ("auto", "torch", "openvino")


def select_engine(name: str, embedder: Embedder, precision: str, cache_root: str | Path) -> TorchEngine | OpenVINOEngine:
    """The engine ``name`` asks for, ready to run; ``engine.reason`` is one line saying why it runs.

    ``auto``: OpenVINO on a CPU when it is installed and the model exports, torch otherwise.
    ``openvino``: fails at once (with the install command) when the extra is missing or the model
    is not on the CPU; a model that does not export runs on torch, and the reason says so.
    """
    if name not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {name!r}")
    precision = resolve_precision(precision, embedder.device)
    if name == "torch":
        return TorchEngine(embedder, precision, "torch: --engine torch (the default)")
    installed = openvino_module() is not None
    if name == "openvino":
        if not installed:
            raise ModelUnavailableError(f"--engine openvino: OpenVINO is not installed; {INSTALL}")
        if embedder.device.type != "cpu":
            raise ValueError(f"--engine openvino runs on the CPU; the model is on {embedder.device} (use --device cpu)")
    elif not installed:
        return TorchEngine(embedder, precision, f"torch: OpenVINO is not installed ({INSTALL} for the faster CPU engine)")
    elif embedder.device.type != "cpu":
        return TorchEngine(embedder, precision, f"torch: the model is on {embedder.device}, OpenVINO here runs on the CPU")
    if embedder.has_output_mix or not embedder.has_image:
        return TorchEngine(embedder, precision, f"torch: OpenVINO export of {embedder.name}'s image tower is not supported")
    try:
        engine = OpenVINOEngine(embedder, precision, example_batch(embedder), Path(cache_root), "")
    except ExportError as exc:
        return TorchEngine(embedder, precision, f"torch: {embedder.name} did not export to OpenVINO ({exc}); fell back to torch")
    how = "compiled model reused" if engine.reused else "exported and compiled"
    engine.reason = f"openvino {engine.hint}: {'asked for' if name == 'openvino' else 'auto, CPU with OpenVINO installed'}; {how} in {engine.directory}"
    return engine


def example_batch(embedder: Embedder, batch: int = 2) -> torch.Tensor:
    """A seeded noise batch in the shape ``embedder.image_transform`` makes (export and checks)."""
    rng = torch.Generator().manual_seed(0)
    noise = torch.randint(0, 256, (batch, 96, 128, 3), dtype=torch.uint8, generator=rng).numpy()
    return torch.stack([embedder.image_transform(Image.fromarray(image)) for image in noise])


__all__ = [
    "ENGINES", "PRECISIONS", "ExportError", "OpenVINOEngine", "TorchEngine", "autocast_context",
    "bf16_is_native", "resolve_precision", "select_engine",
]  # fmt: skip
