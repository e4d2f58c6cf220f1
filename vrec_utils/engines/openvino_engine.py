"""The OpenVINO inference engine for CPUs (optional extra ``vrec[openvino]``).

The image tower is converted from the torch module once (``openvino.convert_model`` with an
example batch), saved as IR under ``<workdir>/engines/openvino/<model>-<key>/`` (the key: weights,
preprocessing, input shape, precision and OpenVINO version), and compiled with OpenVINO's own
compiled-model cache (``CACHE_DIR``) in the same folder: a second run reads both instead of
converting and compiling again; other weights get another key, so another folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from ..models.base import Embedder
from ..store import slugify
from .torch_engine import EncodeImage

INSTALL = "pip install 'vrec[openvino]'  (or: pip install openvino)"


class ExportError(RuntimeError):
    """The model does not convert to OpenVINO, or the converted model does not match torch."""


def openvino_module():
    """The ``openvino`` package, or None where the extra is not installed."""
    try:
        import openvino  # optional extra: imported only when an engine is chosen
    except ImportError:
        return None
    return openvino


def inference_precision(ov, precision: str) -> str:
    """OpenVINO's INFERENCE_PRECISION_HINT for a vrec precision: bf16 only where the CPU has it."""
    if precision != "bf16":
        return "f32"
    capabilities = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    return "bf16" if "BF16" in capabilities else "f32"


class OpenVINOEngine:
    name = "openvino"

    def __init__(self, embedder: Embedder, precision: str, example: torch.Tensor, cache_root: Path, reason: str) -> None:
        ov = openvino_module()
        if ov is None:
            raise ExportError(f"OpenVINO is not installed; {INSTALL}")
        self.embedder = embedder
        self.precision = precision
        self.hint = inference_precision(ov, precision)
        self.reason = reason
        self.directory = engine_directory(cache_root, embedder, self.hint, tuple(example.shape[1:]), ov.__version__)
        self.reused = (self.directory / "model.xml").is_file() and (self.directory / "model.bin").is_file()
        if not self.reused:
            self._export(ov, example)
        core = ov.Core()
        config = {"INFERENCE_PRECISION_HINT": self.hint, "PERFORMANCE_HINT": "LATENCY", "CACHE_DIR": str(self.directory / "compiled")}
        try:
            self.compiled = core.compile_model(core.read_model(self.directory / "model.xml"), "CPU", config)
        except RuntimeError as exc:
            raise ExportError(f"OpenVINO could not compile {embedder.name}: {str(exc).splitlines()[0]}") from exc
        self.request = self.compiled.create_infer_request()
        self._check(example)

    def identity(self) -> dict:
        return {"engine": "openvino", "inference_precision": self.hint}

    def describe(self) -> str:
        return f"openvino {self.hint} ({'compiled model reused' if self.reused else 'exported'} from {self.directory})"

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(pixels.numpy(), dtype=np.float32)  # NCHW, as exported
        result = self.request.infer({0: array}, share_inputs=True)
        return torch.from_numpy(np.array(result[0], dtype=np.float32))

    def _export(self, ov, example: torch.Tensor) -> None:
        module = EncodeImage(self.embedder).eval()
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")  # TracerWarnings
                model = ov.convert_model(module, example_input=example.contiguous())
            model.reshape({model.inputs[0]: ov.PartialShape([-1, *example.shape[1:]])})
        except Exception as exc:  # the converter raises many types; all mean "does not export"
            raise ExportError(f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else 'no message'}") from exc
        self.directory.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".export-", dir=self.directory.parent))
        try:
            ov.save_model(model, staging / "model.xml", compress_to_fp16=False)
            (staging / "engine.json").write_text(json.dumps(self._record(ov), indent=2, sort_keys=True))
            try:
                os.replace(staging, self.directory)  # atomic: a reader sees all of it or nothing
            except OSError:  # another process exported the same model first: use theirs
                pass
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _record(self, ov) -> dict:
        return {"model": self.embedder.name, **self.embedder.identity(), "openvino": ov.__version__, "inference_precision": self.hint}

    def _check(self, example: torch.Tensor) -> None:
        """The converted model must run another batch size and agree with torch fp32 on an input
        other than the example the conversion saw (a trace that baked data-dependent Python in fails here): cosine >= 0.999 in
        f32, >= 0.99 under the bf16 hint (bf16 arithmetic alone costs up to ~0.005 on real images)."""
        probe = torch.cat([example.flip(0), example[:1].flip(-1)])  # other rows, another batch size
        with torch.inference_mode():
            reference = self.embedder.encode_image(probe.to(self.embedder.device)).float().cpu()
        try:
            got = self.encode_images(probe)
        except RuntimeError as exc:
            raise ExportError(f"converted model fails on another batch: {str(exc).strip().splitlines()[-1][:160]}") from exc
        if got.shape != reference.shape:
            raise ExportError(f"converted model gives shape {tuple(got.shape)}, torch {tuple(reference.shape)}")
        cosine = torch.nn.functional.cosine_similarity(got, reference).min().item()
        floor = 0.999 if self.hint == "f32" else 0.99
        if not cosine >= floor:
            raise ExportError(f"converted model disagrees with torch fp32 (min cosine {cosine:.4f} < {floor})")


def engine_directory(cache_root: Path, embedder: Embedder, hint: str, input_shape: tuple, version: str) -> Path:

    fields = {"identity": embedder.identity(), "hint": hint, "input": list(input_shape), "openvino": version}
    key = hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return Path(cache_root) / "engines" / "openvino" / f"{slugify(embedder.name)}-{key}"
