"""The OpenVINO inference engine for CPUs (optional extra ``vrec[openvino]``): image towers
(pixels -> vectors) and text towers (token ids -> vectors).

A tower is converted from the torch module once (``openvino.convert_model`` with an example
input), saved as IR under ``<workdir>/engines/openvino/<model>[-text]-<key>/`` (the key: weights,
preprocessing, input shapes, precision and OpenVINO version), and compiled with OpenVINO's own
compiled-model cache (``CACHE_DIR``) in the same folder: a second run reads both instead of
converting and compiling again; other weights get another key, so another folder.

Text inputs: towers trained on a fixed padded length (SigLIP, open_clip: ``text_length``) keep
it, so the IR has one static sequence axis and the ids are those torch sees; attention-masked
towers (MiniLM) get a dynamic sequence axis, because a batch of product titles is ~10-20 tokens
where a fixed 256 would cost >10x the arithmetic for the same vectors.

Every compile is checked against torch fp32 on inputs the conversion did not see (real images or
texts where the caller gives them): cosine >= 0.999 in f32; under the bf16 hint the measured
cosine is kept in ``check_cosine`` and said in the engine's reason, because bf16 is opt-in.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import shutil
import sys
import tempfile
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..images import split_transform
from ..models.base import Embedder
from ..store import slugify
from .torch_engine import EncodeImage, EncodeTokens

INSTALL = "pip install 'vrec[openvino]'  (or: pip install openvino)"
#: the cosine to torch fp32 every f32 compile must keep, and the floor below which a bf16
#: compile counts as a broken conversion rather than bf16 rounding (real efficientnet-lite0
#: weights on real images: 0.98 under bf16 in OpenVINO and in torch alike)
F32_BAR, BF16_FLOOR = 0.999, 0.95
#: texts the text towers are traced with (of different lengths, so attention masks hold padding)
EXAMPLE_TEXTS = ("red dress", "men's black leather lace-up shoes with a rubber sole", "blue denim jacket")
PROBE_TEXTS = ("white cotton t-shirt", "gold watch", "women's floral summer skirt, knee length", "kids sandals")


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


class _OpenVINOTower:
    """What the image and text engines share: the keyed folder, export, compile and the check."""

    name = "openvino"
    tower = "image"
    #: OpenVINO's PERFORMANCE_HINT (see :class:`StreamRequests`)
    performance = "LATENCY"

    def __init__(self, embedder: Embedder, precision: str, cache_root: Path, reason: str) -> None:
        self.ov = openvino_module()
        if self.ov is None:
            raise ExportError(f"OpenVINO is not installed; {INSTALL}")
        self.embedder = embedder
        self.hint = inference_precision(self.ov, precision)
        self.precision = "bf16" if self.hint == "bf16" else "fp32"
        self.reason = reason
        self.precision_choice: dict | None = None  # set where precision auto was measured
        self.check_cosine = float("nan")
        self.cache_root = cache_root
        self.directory = engine_directory(cache_root, embedder, self.hint, self.input_key(), self.ov.__version__, self.tower)
        self.reused = (self.directory / "model.xml").is_file() and (self.directory / "model.bin").is_file()

    def input_key(self) -> Any:
        raise NotImplementedError

    def identity(self) -> dict:
        return {"engine": "openvino", "inference_precision": self.hint}

    def describe(self) -> str:
        streams = f", {len(self.request.requests)} streams" if len(self.request.requests) > 1 else ""
        return f"openvino {self.hint}{streams} ({'compiled model reused' if self.reused else 'exported'} from {self.directory})"

    def _build(self, module: torch.nn.Module, example: tuple[torch.Tensor, ...], shapes: list[list[int]], prepare=None) -> None:
        """Convert (unless the folder holds the IR already), compile, and keep an infer request.
        ``prepare``: adds OpenVINO preprocessing to the model read from the IR before it compiles."""
        core = self.ov.Core()
        if not self.reused:
            sibling = self._sibling_ir()  # the same IR compiled under the other hint: no second export
            model = core.read_model(sibling) if sibling is not None else convert(self.ov, module, example, shapes)
            save_ir(self.ov, model, self.directory, self._record())
        self.request = self._compile(core, prepare)

    def _compile(self, core, prepare=None) -> StreamRequests:
        """The infer requests of the folder's IR, compiled under this engine's hints; OpenVINO keeps
        the compiled blob in ``compiled/`` (keyed by the model, preprocessing included) for the next run."""
        config = {"INFERENCE_PRECISION_HINT": self.hint, "PERFORMANCE_HINT": self.performance, "CACHE_DIR": str(self.directory / "compiled")}
        try:
            with signal_stack_kept():
                model = core.read_model(self.directory / "model.xml")
                return StreamRequests(core.compile_model(prepare(model) if prepare else model, "CPU", config))
        except RuntimeError as exc:
            raise ExportError(f"OpenVINO could not compile {self.embedder.name}: {str(exc).splitlines()[0]}") from exc

    def _sibling_ir(self) -> Path | None:
        """model.xml of this tower exported for the other precision hint (the IR is f32 either way:
        the hint acts at compile time), or None."""
        for hint in {"f32", "bf16"} - {self.hint}:
            other = engine_directory(self.cache_root, self.embedder, hint, self.input_key(), self.ov.__version__, self.tower)
            if (other / "model.xml").is_file() and (other / "model.bin").is_file():
                return other / "model.xml"
        return None

    def _record(self) -> dict:
        return {
            "model": self.embedder.name, **self.embedder.identity(), "tower": self.tower, "openvino": self.ov.__version__,
            "inference_precision": self.hint,
        }  # fmt: skip

    def _check(self, run: Callable[[], torch.Tensor], reference: Callable[[], torch.Tensor] | torch.Tensor) -> None:
        """The converted model must agree with torch fp32 on inputs other than the example the
        conversion saw (a trace that baked data-dependent Python in fails here). ``reference``:
        torch fp32's vectors for those inputs, or how to compute them."""
        with torch.inference_mode():
            expected = (reference if isinstance(reference, torch.Tensor) else reference()).float().cpu()
        try:
            got = run()
        except RuntimeError as exc:
            raise ExportError(f"converted model fails on other inputs: {str(exc).strip().splitlines()[-1][:160]}") from exc
        if got.shape != expected.shape:
            raise ExportError(f"converted model gives shape {tuple(got.shape)}, torch {tuple(expected.shape)}")
        self.check_cosine = torch.nn.functional.cosine_similarity(got, expected).min().item()
        floor = F32_BAR if self.hint == "f32" else BF16_FLOOR
        if not self.check_cosine >= floor:
            raise ExportError(f"converted model disagrees with torch fp32 (min cosine {self.check_cosine:.4f} < {floor})")


class OpenVINOEngine(_OpenVINOTower):
    """An embedder's image tower on OpenVINO: ``encode_images(pixels)`` as the torch engine's.

    Where the model's transform splits into a PIL stage and a per-batch normalisation
    (:func:`~vrec_utils.images.split_transform`), the model is compiled to take the PIL stage's
    uint8 (B, H, W, 3) batch and to normalise and transpose it itself: the same ``x / 255``, ``- mean``,
    ``/ std`` as torch, computed in OpenVINO's graph (on efficientnet-lite0 the Python normalisation
    and NCHW copy cost 1.4 ms per image in the process that feeds the model, ~30% of its forward).
    Float (B, 3, H, W) batches still work: a float-input model is compiled for them on first use.
    Compiled for throughput: each batch is split over the CPU's streams (:class:`StreamRequests`);
    extraction queues batches in parts, decoding the next while they run (:meth:`encode_stream`).
    """

    performance = "THROUGHPUT"

    def __init__(
        self, embedder: Embedder, precision: str, example: torch.Tensor, cache_root: Path, reason: str, check: torch.Tensor | None = None,
        reference: torch.Tensor | None = None,
    ) -> None:  # fmt: skip
        """``example``: float model input the tower is converted with; ``check``: either batch form
        (:func:`~vrec_utils.images.pixel_batch`); ``reference``: torch fp32's vectors for ``check``
        where the caller has them already."""
        self.input_shape = tuple(example.shape[1:])
        super().__init__(embedder, precision, Path(cache_root), reason)
        split = split_transform(embedder.image_transform)
        self.normalize = split[1] if split else None
        self._float_request = None
        self._build(EncodeImage(embedder).eval(), (example.contiguous(),), [[-1, *self.input_shape]], self._uint8_input if split else None)
        if self.normalize is None:
            self._float_request = self.request
        probe = check if check is not None and len(check) else self._default_probe(example)
        expected = reference if reference is not None and check is not None else lambda: embedder.encode_image(self._float(probe).to(embedder.device))
        self._check(lambda: self.encode_images(probe), expected)

    def input_key(self) -> Any:
        return list(self.input_shape)

    def _uint8_input(self, model):
        """``model`` taking the PIL stage's uint8 NHWC batch, normalised inside (see the class)."""
        from openvino.preprocess import PrePostProcessor  # optional extra

        steps = PrePostProcessor(model)
        steps.input(0).tensor().set_element_type(self.ov.Type.u8).set_layout(self.ov.Layout("NHWC"))
        steps.input(0).model().set_layout(self.ov.Layout("NCHW"))
        mean, std = self.normalize.mean.flatten().tolist(), self.normalize.std.flatten().tolist()
        steps.input(0).preprocess().convert_element_type(self.ov.Type.f32).scale(255.0).mean(mean).scale(std)
        return steps.build()

    def _default_probe(self, example: torch.Tensor) -> torch.Tensor:
        """Inputs other than the conversion's example, in the form the compiled model takes."""
        if self.normalize is None:
            return torch.cat([example.flip(0), example[:1].flip(-1)])
        height, width = self.input_shape[1:]
        return torch.randint(0, 256, (3, height, width, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))

    def _float(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.normalize(pixels) if pixels.dtype == torch.uint8 and self.normalize is not None else pixels

    def encode_stream(self, batches: Iterable[tuple[Any, torch.Tensor | None]]) -> Iterator[tuple[Any, torch.Tensor | None]]:
        """``(tag, vectors)`` for each ``(tag, pixels)`` of ``batches``, in order: the PIL stage's
        uint8 batches run through :meth:`StreamRequests.infer_stream` (the next batch is decoded
        while this one runs), anything else one batch at a time (:meth:`encode_images`)."""

        def jobs():
            for tag, pixels in batches:
                queued = pixels is not None and pixels.dtype == torch.uint8 and self.normalize is not None
                yield (tag, pixels, queued), ({0: np.ascontiguousarray(pixels.numpy())} if queued else None)

        for (tag, pixels, queued), output in self.request.infer_stream(jobs()):
            if queued:
                yield tag, torch.from_numpy(output)
            else:
                yield tag, None if pixels is None else self.encode_images(pixels)

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.dtype == torch.uint8:
            if self.normalize is None:
                raise ValueError(f"{self.embedder.name}'s transform has no batch stage: give float pixels, not uint8")
            return torch.from_numpy(self.request.infer({0: np.ascontiguousarray(pixels.numpy())}))
        if self._float_request is None:
            self._float_request = self._compile(self.ov.Core())
        array = np.ascontiguousarray(pixels.numpy(), dtype=np.float32)  # NCHW, as exported
        return torch.from_numpy(self._float_request.infer({0: array}))


class OpenVINOTextEngine(_OpenVINOTower):
    """An embedder's text tower on OpenVINO: ``encode_texts(texts)``; the tokenizer stays in Python."""

    tower = "text"

    def __init__(self, embedder: Embedder, precision: str, cache_root: Path, reason: str, check: Sequence[str] | None = None) -> None:
        example = embedder.tokenize(list(EXAMPLE_TEXTS))
        self.names = list(example)
        self.dtypes = {name: example[name].numpy().dtype for name in self.names}
        super().__init__(embedder, precision, Path(cache_root), reason)
        length = embedder.text_length or -1
        module = EncodeTokens(embedder, self.names).eval()
        self._build(module, tuple(example[name] for name in self.names), [[-1, length]] * len(self.names))
        probe = list(check) if check else list(PROBE_TEXTS)
        self._check(lambda: self.encode_texts(probe), lambda: embedder.encode_text(probe))

    def input_key(self) -> Any:
        return {"inputs": self.names, "length": self.embedder.text_length or "dynamic"}

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        if not len(texts):
            return torch.empty(0, self.embedder.dim)
        tokens = self.embedder.tokenize(list(texts))
        inputs = {i: np.ascontiguousarray(tokens[name].numpy(), dtype=self.dtypes[name]) for i, name in enumerate(self.names)}
        return torch.from_numpy(self.request.infer(inputs))


@dataclass
class _Job:
    """One batch of :meth:`StreamRequests.infer_stream`: its inputs stay referenced until done."""

    tag: Any
    inputs: dict | None
    outputs: list = field(default_factory=list)  # one per part, None while it runs

    @property
    def done(self) -> bool:
        return all(output is not None for output in self.outputs)


class StreamRequests:
    """A compiled model's infer requests, one per CPU stream: ``infer`` splits a batch over them and
    runs the parts at once. Under the THROUGHPUT hint each stream has its own cores (2 streams of
    one core on 2 cores), so the model's layers never wait at a barrier for a core that the
    decoding took: efficientnet-lite0 ran 200-205 img/s in the pipeline and 239-249 forward
    alone, against 177-190 and 220-237 with one LATENCY stream on both cores (2-core Xeon, same
    vectors). A batch smaller than the streams uses fewer of them (a single query image runs on one)."""

    def __init__(self, compiled, count: int | None = None) -> None:
        count = count or max(1, int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
        self.compiled = compiled
        self.requests = [compiled.create_infer_request() for _ in range(count)]
        self.model_inputs = self.requests[0].model_inputs

    def infer(self, inputs: dict) -> np.ndarray:
        """Output 0 for ``inputs`` (arrays sharing their first, batch axis), float32 rows in order."""
        size = len(next(iter(inputs.values())))
        parts = max(1, min(len(self.requests), size))
        if parts == 1:
            return np.array(self.requests[0].infer(inputs, share_inputs=True)[0], dtype=np.float32)
        bounds = np.linspace(0, size, parts + 1).astype(int)
        running = self.requests[:parts]
        for request, start, stop in zip(running, bounds[:-1], bounds[1:]):
            request.start_async({port: array[start:stop] for port, array in inputs.items()}, share_inputs=True)
        for request in running:
            request.wait()
        return np.concatenate([np.array(request.get_output_tensor(0).data, dtype=np.float32) for request in running])

    def infer_stream(self, jobs: Iterable[tuple[Any, dict | None]]) -> Iterator[tuple[Any, np.ndarray | None]]:
        """``(tag, output 0)`` for each ``(tag, inputs)`` of ``jobs``, in order (None for None inputs),
        with the streams kept busy while the caller prepares the next job.

        Each batch is cut into 4 parts per stream, queued on twice as many requests as one batch
        takes: a stream takes the next part as soon as it is free, so it never waits at the end of
        a batch for the other stream's half (as :meth:`infer` does), and a whole batch is still
        queued while the caller decodes the next one on the same cores. efficientnet-lite0, 2-core
        Xeon, 1,024 images, batch 32: 212-225 img/s against 185-195 through :meth:`infer`, same vectors;
        forward alone 245-259 against 203-252. Requests read the caller's arrays in place
        (``share_inputs``), so each job's inputs stay referenced until its parts are done."""
        parts_per_batch = 4 * len(self.requests)
        # requests of this call's own (16 on 2 streams: ~0.5 ms), never busy with another caller's work
        free = deque(self.compiled.create_infer_request() for _ in range(2 * parts_per_batch))
        running: deque[tuple[Any, _Job, int]] = deque()  # (request, job, part) in the order started
        waiting: deque[_Job] = deque()  # jobs in order, until all their parts are done

        def finish_oldest() -> None:
            request, job, part = running.popleft()
            request.wait()
            job.outputs[part] = np.array(request.get_output_tensor(0).data, dtype=np.float32)
            free.append(request)

        def finished() -> Iterator[tuple[Any, np.ndarray | None]]:
            while waiting and waiting[0].done:
                job = waiting.popleft()
                yield job.tag, None if job.inputs is None else np.concatenate(job.outputs)

        try:
            for tag, inputs in jobs:
                job = _Job(tag, inputs)
                waiting.append(job)
                if inputs is not None:
                    size = len(next(iter(inputs.values())))
                    bounds = np.linspace(0, size, max(1, min(parts_per_batch, size)) + 1).astype(int)
                    job.outputs = [None] * (len(bounds) - 1)
                    for part, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:])):
                        while not free:
                            finish_oldest()
                        request = free.popleft()
                        request.start_async({port: array[start:stop] for port, array in inputs.items()}, share_inputs=True)
                        running.append((request, job, part))
                while running and running[0][0].wait_for(0):  # parts already done: no waiting
                    finish_oldest()
                yield from finished()
            while running:
                finish_oldest()
            yield from finished()
        finally:  # stopped early (an error, the caller gone): the requests still read the inputs
            for request, _, _ in running:
                with contextlib.suppress(Exception):  # every one waited for; the first error is what propagates
                    request.wait()


class _SignalStack(ctypes.Structure):
    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]


SS_DISABLE = 2  # <signal.h>, Linux


@contextlib.contextmanager
def signal_stack_kept():
    """Give the calling thread back its own alternate signal stack after OpenVINO work.

    OpenVINO's CPU plugin (2026.4) installs an alternate signal stack of its own (11.8 KB, mmap)
    on the thread that compiles a model, and puts back the one it saw when that model is freed;
    with several models alive, freed in any order, the thread keeps one of OpenVINO's stacks.
    The crash that kept the OpenVINO tests in a process of their own has the signature of a
    signal delivered onto a stack that is gone: SIGSEGV with si_code SI_KERNEL in the main
    thread, inside wait4 (joining a DataLoader worker, whose exit sends SIGCHLD; Python's handlers
    use SA_ONSTACK), with no faulthandler output (its handler needs that stack too). Putting the
    thread's stack back at once means every stack OpenVINO saves and restores is this thread's own
    (faulthandler's, or none), which stays valid for the life of the process.
    """
    libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
    saved = _SignalStack()
    if libc is None or libc.sigaltstack(None, ctypes.byref(saved)) != 0:
        yield
        return
    try:
        yield
    finally:
        current = _SignalStack()
        libc.sigaltstack(None, ctypes.byref(current))
        if (current.ss_sp, current.ss_size, current.ss_flags & SS_DISABLE) != (saved.ss_sp, saved.ss_size, saved.ss_flags & SS_DISABLE):
            saved.ss_flags &= SS_DISABLE  # the only flag sigaltstack takes when setting
            libc.sigaltstack(ctypes.byref(saved), None)


def convert(ov, module: torch.nn.Module, example: tuple[torch.Tensor, ...], shapes: list[list[int]]):
    """``module`` as an OpenVINO model with ``shapes`` (-1: any size); ExportError if it does not convert."""
    from openvino.frontend.pytorch.ts_decoder import TorchScriptPythonDecoder  # optional extra

    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # TracerWarnings
            # torch.jit.trace's own check runs the model twice more and compares (about a third of
            # a first run's export of efficientnet-lite0); the engine's _check does that job
            # against torch fp32 on inputs the trace did not see
            decoder = TorchScriptPythonDecoder(module, example_input=example if len(example) > 1 else example[0], trace_kwargs={"check_trace": False})
            model = ov.convert_model(decoder)
        model.reshape({port: ov.PartialShape(shape) for port, shape in zip(model.inputs, shapes)})
    except Exception as exc:  # the converter raises many types; all mean "does not export"
        raise ExportError(f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else 'no message'}") from exc
    return model


def save_ir(ov, model, directory: Path, record: dict) -> None:
    """Save the IR and its record under ``directory``, atomically: a reader sees all of it or nothing."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".export-", dir=directory.parent))
    try:
        ov.save_model(model, staging / "model.xml", compress_to_fp16=False)
        (staging / "engine.json").write_text(json.dumps(record, indent=2, sort_keys=True, default=str))
        try:
            os.replace(staging, directory)
        except OSError:  # another process exported the same model first: use theirs
            pass
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def engine_directory(cache_root: Path, embedder: Embedder, hint: str, inputs: Any, version: str, tower: str = "image") -> Path:
    fields = {"identity": embedder.identity(), "hint": hint, "input": inputs, "openvino": version}
    if tower != "image":  # image folders keep the keys they had before text towers existed
        fields["tower"] = tower
    key = hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:12]
    name = slugify(embedder.name) + ("" if tower == "image" else f"-{tower}")
    return Path(cache_root) / "engines" / "openvino" / f"{name}-{key}"
