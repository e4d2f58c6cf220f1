"""The PyTorch inference engines: images (eager, or a frozen bf16 trace for CNNs on bf16-native
CPUs) and texts (eager)."""

from __future__ import annotations

import contextlib
import platform
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from ..images import split_transform
from ..models.base import Embedder

PRECISIONS = ("auto", "fp32", "bf16")


def _cpuinfo_field(field: str) -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    for line in text.splitlines():
        if line.startswith(field):
            return line.split(":", 1)[1].strip()
    return ""


def cpu_flags() -> set[str]:
    return set(_cpuinfo_field("flags").split())


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo; the platform's processor string elsewhere)."""
    return _cpuinfo_field("model name") or platform.processor() or platform.machine()


def bf16_is_native(device: torch.device) -> bool:
    """True where bf16 matmuls run in hardware: AVX512-BF16/AMX CPUs, Ampere+ GPUs."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())
    return False


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        return "bf16" if bf16_is_native(device) else "fp32"
    return precision


def autocast_context(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class _TorchRun:
    """What the torch image and text engines share: the embedder, the precision it runs under and
    why, and no cache-key fields of their own."""

    name = "torch"

    def __init__(self, embedder: Embedder, precision: str, reason: str) -> None:
        self.embedder = embedder
        self.precision = precision
        self.reason = reason
        self.precision_choice: dict | None = None  # set where precision auto was measured

    def identity(self) -> dict:
        """Fields added to the cache key: none, so caches made before engines existed stay valid."""
        return {}


class TorchEngine(_TorchRun):
    """Runs ``embedder.encode_image`` under ``inference_mode`` and the precision's autocast, on
    either form of :func:`~vrec_utils.images.pixel_batch` (a uint8 batch is normalised here)."""

    def __init__(self, embedder: Embedder, precision: str, reason: str) -> None:
        super().__init__(embedder, precision, reason)
        self.encoder = FrozenCNNEncoder(embedder, precision)
        split = split_transform(embedder.image_transform) if embedder.has_image else None
        self.normalize = split[1] if split else None

    def describe(self) -> str:
        return f"torch {self.precision}" + (" (frozen trace)" if self.encoder.frozen is not None else "")

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        pixels = pixels.to(self.embedder.device, non_blocking=True)
        if pixels.dtype == torch.uint8:  # normalised where the model runs: on a GPU, a quarter of the bytes travel
            if self.normalize is None:
                raise ValueError(f"{self.embedder.name}'s transform has no batch stage: give float pixels, not uint8")
            pixels = self.normalize(pixels, channels_last=self.embedder.prefers_channels_last)
        if self.embedder.prefers_channels_last:
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), autocast_context(self.precision, self.embedder.device):
            return self.encoder(pixels).float()


class TorchTextEngine(_TorchRun):
    """Runs ``embedder.encode_text`` under ``inference_mode`` and the precision's autocast."""

    def describe(self) -> str:
        return f"torch {self.precision}"

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        with torch.inference_mode(), autocast_context(self.precision, self.embedder.device):
            return self.embedder.encode_text(list(texts)).float()


class FrozenCNNEncoder:
    """``embedder.encode_image``, traced and frozen for bf16 CNN inference on the CPU.

    Under CPU autocast every forward casts the fp32 weights to bf16 again; freezing a trace taken
    under autocast bakes the bf16 weights (and BatchNorm) into the graph once, which is ~1.4x
    faster for ResNet50 and EfficientNet-Lite0 here. Anything else, or any failure to trace,
    runs the eager model unchanged.
    """

    def __init__(self, embedder: Embedder, precision: str) -> None:
        self.embedder = embedder
        self.enabled = embedder.prefers_channels_last and precision == "bf16" and embedder.device.type == "cpu"
        self.frozen = None

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.enabled and self.frozen is None:
            self.frozen = self._freeze(pixels)
            self.enabled = self.frozen is not None
        return self.frozen(pixels) if self.frozen is not None else self.embedder.encode_image(pixels)

    def _freeze(self, example: torch.Tensor):
        module = EncodeImage(self.embedder)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # TracerWarnings about data-independent shapes
                with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
                    frozen = torch.jit.freeze(torch.jit.trace(module.eval(), example, check_trace=False))
                eager = self.embedder.encode_image(example[:2]).float()
                check = frozen(example[:2]).float()
        except (RuntimeError, TypeError, ValueError):
            return None
        same = torch.nn.functional.cosine_similarity(eager, check).min().item() > 0.999
        return frozen if same else None


class EncodeImage(torch.nn.Module):
    """``embedder.encode_image`` as one module with frozen parameters (for tracing and export)."""

    def __init__(self, embedder: Embedder) -> None:
        super().__init__()
        self.embedder = embedder
        for module in embedder.modules():
            for parameter in module.parameters():
                parameter.requires_grad_(False)  # frozen graphs hold weights as constants

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.embedder.encode_image(pixels)


class EncodeTokens(torch.nn.Module):
    """``embedder.encode_tokens`` as one module taking the token tensors ``names`` positionally."""

    def __init__(self, embedder: Embedder, names: Sequence[str]) -> None:
        super().__init__()
        self.embedder = embedder
        self.names = list(names)
        for module in embedder.modules():
            for parameter in module.parameters():
                parameter.requires_grad_(False)

    def forward(self, *tokens: torch.Tensor) -> torch.Tensor:
        return self.embedder.encode_tokens(dict(zip(self.names, tokens)))
