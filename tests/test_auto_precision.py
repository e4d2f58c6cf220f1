"""Precision ``auto`` on a CPU as a measured choice (vrec_utils/engines/auto_precision.py): the
faster candidate within the cosine bar, decided once per CPU/model/engine and kept on disk, and
the decision in the store key and manifest exactly as an explicit precision."""

from __future__ import annotations

import json

import pytest
import torch

from test_engines import NormalizedConvEmbedder
from vrec_utils import engines
from vrec_utils.engines import auto_precision, select_engine
from vrec_utils.engines.auto_precision import Measurement, measure, pick
from vrec_utils.extract import extract_image_embeddings


def timings(fp32: float, bf16: float, bf16_cosine: float = 0.99995):
    """A stand-in for auto_precision.measure giving these seconds per call (8 images each)."""

    def fake(built, pixels, reference, **_):  # noqa: ARG001
        assert set(built) == {"fp32", "bf16"}
        return {"fp32": Measurement(fp32, 1.0, 8), "bf16": Measurement(bf16, bf16_cosine, 8)}

    return fake


@pytest.fixture
def two_candidates(monkeypatch):
    """bf16 is a candidate whatever this machine's CPU (torch runs bf16 autocast on any CPU)."""
    monkeypatch.setattr(engines, "bf16_is_native", lambda device: True)


def test_pick_takes_the_faster_precision_within_the_bar():
    fp32 = Measurement(1.0, 1.0, 8)
    assert pick({"fp32": fp32, "bf16": Measurement(0.5, 0.99999, 8)}) == ("bf16", "auto: bf16 (2.00x fp32, min cosine 0.99999)")
    assert pick({"fp32": fp32, "bf16": Measurement(1 / 0.6, 0.99999, 8)}) == ("fp32", "auto: fp32 (bf16 0.60x as fast here, min cosine 0.99999)")
    assert pick({"fp32": fp32, "bf16": Measurement(0.98, 0.99999, 8)})[0] == "fp32"  # 1.02x: within timing noise, fp32 is exact
    assert pick({"fp32": fp32}) == ("fp32", "auto: fp32 (this CPU has no bf16)")


def test_pick_refuses_a_faster_candidate_below_the_cosine_bar():
    precision, reason = pick({"fp32": Measurement(1.0, 1.0, 8), "bf16": Measurement(0.25, 0.982, 8)})
    assert precision == "fp32" and reason == "auto: fp32 (bf16 4.00x as fast here but min cosine 0.9820 < 0.999)"
    failed = Measurement(float("nan"), float("nan"), 8, "converted model disagrees")
    assert pick({"fp32": Measurement(1.0, 1.0, 8), "bf16": failed}) == ("fp32", "auto: fp32 (bf16 failed: converted model disagrees)")


class Fake:
    """An engine whose every call takes ``cost`` seconds on the shared fake clock."""

    def __init__(self, clock: list[float], cost: float, output: torch.Tensor) -> None:
        self.clock, self.cost, self.output, self.calls = clock, cost, output, []

    def encode_images(self, pixels):
        self.clock[0] += self.cost
        self.calls.append(len(pixels))
        return self.output[: len(pixels)]


def test_measure_times_each_candidate_and_its_cosine_on_the_check_batch():
    reference = torch.randn(32, 16)
    off = reference.clone()
    off[3] = -reference[3]  # one image pointing the other way: min cosine -1
    clock = [0.0]
    fast, slow = Fake(clock, 1.0, off), Fake(clock, 3.0, reference)
    measured = measure({"fp32": slow, "bf16": fast}, torch.zeros(32, 3, 4, 4), reference, warmups=1, repeats=2, clock=lambda: clock[0])
    assert measured["fp32"].seconds == 3.0 and measured["bf16"].seconds == 1.0 and measured["bf16"].images == 8
    assert measured["fp32"].min_cosine == pytest.approx(1.0) and measured["bf16"].min_cosine == pytest.approx(-1.0)
    assert slow.calls == [32, 8, 8, 8]  # the cosine on all 32, a warm-up and two timed calls on 8
    assert pick(measured)[0] == "fp32"
    clock[0], slow.calls = 0.0, []
    again = measure({"fp32": slow, "bf16": fast}, torch.zeros(32, 3, 4, 4), reference, warmups=1, repeats=2, clock=lambda: clock[0], exact="fp32")
    assert slow.calls == [8, 8, 8] and again["fp32"].min_cosine == 1.0  # torch fp32 is the reference: not run on all 32 again


def test_the_decision_is_measured_once_and_reused(tmp_path, two_candidates, monkeypatch):
    monkeypatch.setattr(auto_precision, "measure", timings(fp32=1.0, bf16=0.7))
    first = select_engine("torch", NormalizedConvEmbedder(seed=0), "auto", tmp_path)
    assert first.precision == "bf16" and first.reason.endswith("auto: bf16 (1.43x fp32, min cosine 0.99995); measured now on this CPU")
    [saved] = (tmp_path / "engines" / "precision").iterdir()
    record = json.loads(saved.read_text())
    assert record["precision"] == "bf16" and record["candidates"]["fp32"]["images_per_second"] == 8.0
    assert record["key"]["engine"] == "torch" and record["key"]["identity"]["weights"] == "random-init:0"

    def must_not_measure(*args, **kwargs):
        raise AssertionError("measured again")

    monkeypatch.setattr(auto_precision, "measure", must_not_measure)
    second = select_engine("torch", NormalizedConvEmbedder(seed=0), "auto", tmp_path)
    assert second.precision == "bf16" and second.reason.endswith("measured earlier on this CPU")
    with pytest.raises(AssertionError, match="measured again"):  # other weights: another decision
        select_engine("torch", NormalizedConvEmbedder(seed=1), "auto", tmp_path)
    assert select_engine("torch", NormalizedConvEmbedder(seed=0), "fp32", tmp_path).precision == "fp32"  # explicit: as asked


def test_a_torch_bf16_decision_read_from_disk_must_hold_on_this_runs_images(tmp_path, two_candidates, monkeypatch):
    """A bf16 decision was measured on another catalog's images; before it runs on this one, its
    min cosine to torch fp32 is checked on this run's images, and fp32 runs where it misses."""
    monkeypatch.setattr(auto_precision, "measure", timings(fp32=1.0, bf16=0.7))
    assert select_engine("torch", NormalizedConvEmbedder(seed=0), "auto", tmp_path).precision == "bf16"
    real = select_engine("torch", NormalizedConvEmbedder(seed=0), "auto", tmp_path)  # read from disk, checked for real
    pixels = engines.example_batch(real.embedder, raw=True)  # what select_engine checks on without a catalog
    fp32 = select_engine("torch", real.embedder, "fp32", tmp_path)
    assert real.precision == "bf16" and not torch.equal(real.encode_images(pixels), fp32.encode_images(pixels))  # bf16 really ran
    cosine = auto_precision.min_cosine_to_fp32(real, real.embedder, pixels)
    assert cosine >= 0.999  # and held the bar here
    monkeypatch.setattr(auto_precision, "F32_BAR", 1.0)  # a bar bf16 cannot hold: as on images it was never measured on
    held = select_engine("torch", NormalizedConvEmbedder(seed=0), "auto", tmp_path)
    assert held.precision == "fp32" and held.precision_choice["cached"]
    assert f"auto: fp32 (bf16 min cosine {cosine:.4f} < 1.0 on this run's images); measured earlier" in held.reason


def test_the_decision_is_the_store_key_and_in_the_manifest(tmp_path, small_catalog, two_candidates, monkeypatch):
    catalog = small_catalog.head(24)

    def run(workdir, precision):
        return extract_image_embeddings(catalog, NormalizedConvEmbedder(), workdir, num_workers=0, precision=precision, progress=False)

    for fp32, bf16, expected, other in ((1.0, 0.5, "bf16", "fp32"), (0.5, 1.0, "fp32", "bf16")):
        workdir = tmp_path / expected
        monkeypatch.setattr(auto_precision, "measure", timings(fp32=fp32, bf16=bf16))
        auto = run(workdir, "auto")
        assert auto.precision == expected and auto.n_new == 24 and f"auto: {expected} (" in auto.summary()
        manifest = json.loads((auto.cache_dir / "manifest.json").read_text())
        assert manifest["precision"] == expected and manifest["precision_choice"]["precision"] == expected
        assert set(manifest["precision_choice"]["candidates"]) == {"fp32", "bf16"}
        assert auto.to_json()["precision_choice"]["reason"].startswith(f"auto: {expected}")
        same = run(workdir, expected)  # an explicit run of the resolved precision shares the vectors
        assert same.cache_dir == auto.cache_dir and same.n_new == 0 and same.precision_choice is None
        different = run(workdir, other)  # the other precision never does
        assert different.cache_dir != auto.cache_dir and different.n_new == 24


def test_a_real_auto_run_on_a_tiny_model(tmp_path, small_catalog):
    """No stand-ins: the decision is measured on this CPU and is the one its numbers call for."""
    result = extract_image_embeddings(small_catalog.head(40), NormalizedConvEmbedder(), tmp_path, num_workers=0, progress=False)
    choice = result.precision_choice
    assert result.precision == choice["precision"] and "\n" not in result.engine_reason
    if not engines.bf16_is_native(torch.device("cpu")):
        assert choice["reason"] == "auto: fp32 (this CPU has no bf16)"
        return
    measured = {name: Measurement(c["seconds"], c["min_cosine"], c["images"], c["error"]) for name, c in choice["candidates"].items()}
    assert all(m.seconds > 0 and m.images == 8 for m in measured.values()) and measured["fp32"].min_cosine == pytest.approx(1.0)
    assert pick(measured) == (choice["precision"], choice["reason"])
    again = extract_image_embeddings(small_catalog.head(40), NormalizedConvEmbedder(), tmp_path, num_workers=0, progress=False)
    assert again.n_new == 0 and again.cache_dir == result.cache_dir and "measured earlier" in again.engine_reason


def test_a_real_auto_run_on_openvino(tmp_path, small_catalog):
    pytest.importorskip("openvino")
    result = extract_image_embeddings(small_catalog.head(16), NormalizedConvEmbedder(), tmp_path, num_workers=0, engine="openvino", progress=False)
    choice = result.precision_choice
    assert result.engine == "openvino" and result.precision == choice["precision"]
    assert f"openvino {'bf16' if choice['precision'] == 'bf16' else 'f32'}: asked for" in result.engine_reason
    assert "auto: " + choice["precision"] in result.engine_reason
    manifest = json.loads((result.cache_dir / "manifest.json").read_text())
    assert manifest["identity"]["inference_precision"] == ("bf16" if choice["precision"] == "bf16" else "f32")
    if choice.get("candidates"):
        measured = {n: Measurement(c["seconds"], c["min_cosine"], c["images"], c["error"]) for n, c in choice["candidates"].items()}
        assert pick(measured) == (choice["precision"], choice["reason"])



def test_the_second_precision_hint_compiles_the_first_ones_ir_without_exporting(tmp_path, monkeypatch):
    ov = pytest.importorskip("openvino")
    from vrec_utils.engines import openvino_engine

    if openvino_engine.inference_precision(ov, "bf16") != "bf16":
        pytest.skip("this CPU has no bf16 hint: one IR only")
    f32 = select_engine("openvino", NormalizedConvEmbedder(), "fp32", tmp_path)

    def must_not_convert(*args, **kwargs):
        raise AssertionError("exported again")

    monkeypatch.setattr(openvino_engine, "convert", must_not_convert)
    bf16 = select_engine("openvino", NormalizedConvEmbedder(), "bf16", tmp_path)
    assert (bf16.hint, f32.hint) == ("bf16", "f32") and bf16.directory != f32.directory and not bf16.reused
    assert json.loads((bf16.directory / "engine.json").read_text())["inference_precision"] == "bf16"
    pixels = torch.randn(4, 3, 32, 32)
    assert torch.nn.functional.cosine_similarity(bf16.encode_images(pixels), f32.encode_images(pixels)).min() > 0.99
    with pytest.raises(AssertionError, match="exported again"):  # other weights: no IR to share
        select_engine("openvino", NormalizedConvEmbedder(seed=1), "bf16", tmp_path)
