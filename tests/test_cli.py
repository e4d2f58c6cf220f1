from __future__ import annotations

import json

import pytest

from vrec_utils.cli import main


def test_models_lists_registered_and_offline_availability(capsys):
    assert main(["models", "--json", "--all"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["efficientnet-lite0"]["available_here"] == "yes"
    assert rows["tiny-siglip"]["for_tests"] and rows["tiny-siglip"]["text"]
    assert not rows["resnet50"]["offline"]


def test_extract_then_rerun_uses_cache(tmp_path, sample_dir, capsys):
    args = ["extract", "--catalog", str(sample_dir), "--model", "efficientnet-lite0", "--workdir", str(tmp_path),
            "--limit", "24", "--batch-size", "8", "--workers", "0", "--json"]
    assert main(args) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["embedded"] == 24 and first["from_cache"] == 0 and first["skipped"] == 0
    assert main(args) == 0
    second = json.loads(capsys.readouterr().out)
    assert second["embedded"] == 0 and second["from_cache"] == 24


def test_text_extraction_of_titles(tmp_path, sample_dir, capsys):
    catalog_dir = tmp_path / "cat"
    catalog_dir.mkdir()
    lines = (sample_dir / "styles.csv").read_text().splitlines()[:31]
    (catalog_dir / "styles.csv").write_text("\n".join(lines) + "\n")
    (catalog_dir / "images").mkdir()
    assert main(["extract", "--catalog", str(catalog_dir), "--model", "minilm", "--workdir", str(tmp_path / "w"), "--text", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["embedded"] == 30


@pytest.mark.parametrize(
    "argv, message",
    [
        (["extract", "--catalog", "{sample}", "--model", "no-such-model"], "unknown model 'no-such-model'; registered:"),
        (["extract", "--catalog", "{tmp}/nowhere", "--model", "efficientnet-lite0"], "does not exist"),
        (["extract", "--catalog", "{sample}", "--model", "minilm"], "no image tower"),
        (["extract", "--catalog", "{sample}", "--model", "efficientnet-lite0", "--text"], "image-only"),
        (["extract", "--catalog", "{sample}", "--model", "efficientnet-lite0", "--text", "colour"], "column 'colour' is not in catalog"),
    ],
)
def test_user_errors_are_one_line_exit_2(argv, message, tmp_path, sample_dir, capsys):
    argv = [a.format(sample=sample_dir, tmp=tmp_path) for a in argv] + ["--workdir", str(tmp_path)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and err.startswith("vrec extract: error:")
