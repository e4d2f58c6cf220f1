"""`vrec report` end to end: every notebook runs headless in the smoke profile on real images.

One report run (module fixture) on a 120-item seeded sample of the bundled catalog with the tiny
random models; the tests check what it wrote. Then: a second run of the embeddings notebook skips
extraction, a failing cell makes `vrec report` exit non-zero naming the notebook and the cell,
and a profile whose weights are missing stops fast or falls back with a note.
"""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pandas as pd
import pytest

from vrec_utils import notebook, profiles
from vrec_utils.cli import main
from vrec_utils.report import NotebookError, list_notebooks, run_report

pytestmark = pytest.mark.slow

SAMPLE_SIZE = 120
EXPECTED_FIGURES = {
    "00_label_distribution", "00_random_items", "03_red_dress", "03_query_1", "04_visual_search_shoe",
    "04_text_search", "05_ndcg_at_5", "05_per_category", "05_ndcg_vs_dims", "06_embedding_map",
}  # fmt: skip
EVALUATION_COLUMNS = ["model", "setting", "ndcg@5", "ci95_low", "ci95_high", "n_queries"]


@pytest.fixture(scope="module")
def smoke_report(tmp_path_factory):
    base = tmp_path_factory.mktemp("report")
    numbered = [p.stem for p in list_notebooks() if p.stem[:2] <= "06"]  # 07+ belong to other suites
    result = run_report(
        "smoke", out=base / "out", workdir=base / "work", sample_size=SAMPLE_SIZE, notebooks=numbered, progress=False,
        log=lambda line: None,
    )
    return result, base


def test_every_numbered_notebook_ran_without_errors(smoke_report):
    result, _ = smoke_report
    assert [p.stem[:2] for p in result.executed] == ["00", "01", "02", "03", "04", "05", "06"]
    for path in result.executed:
        nb = nbformat.read(path, as_version=4)
        errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.get("output_type") == "error"]
        assert not errors, f"{path.name}: {errors[0]['ename']}: {errors[0]['evalue']}"
        assert nb.cells[[i for i, c in enumerate(nb.cells) if c.cell_type == "code"][0]].metadata["tags"] == ["parameters"]


def test_html_report_has_contents_figures_and_the_evaluation_table(smoke_report):
    result, _ = smoke_report
    html = result.html.read_text(encoding="utf-8")
    assert result.html.name == "report.html" and len(html) > 100_000
    assert "Contents" in html and 'id="nb-05_evaluation"' in html and "href=\"#nb-03_recommendations\"" in html
    for title in ("00 · The catalog", "03 · Recommendations, side by side", "05 · Evaluation"):
        assert title in html
    assert html.count("data:image/png;base64") >= len(EXPECTED_FIGURES)
    for column in EVALUATION_COLUMNS:
        assert f"<th>{column}</th>" in html
    assert "Traceback" not in html and "IProgress" not in html
    assert "tiny-openclip" in html and "tiny-siglip" in html


def test_figures_are_saved_as_png(smoke_report):
    result, _ = smoke_report
    names = {p.stem for p in result.figures}
    assert EXPECTED_FIGURES <= names
    for path in result.figures:
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5_000, path.name


def test_evaluation_table_has_the_expected_rows_and_columns(smoke_report):
    result, _ = smoke_report
    table = pd.read_csv(result.tables_dir / "evaluation.csv")
    assert list(table.columns[:5]) == EVALUATION_COLUMNS[:5] and table.columns[-1] == "n_queries"
    assert set(table["model"]) == {"tiny-openclip", "tiny-siglip"}
    assert set(table["setting"]) == {"unfiltered", "filtered:subCategory"}
    assert ((table["ci95_low"] <= table["ndcg@5"]) & (table["ndcg@5"] <= table["ci95_high"])).all()
    assert (table["n_queries"] > 50).all()
    comparisons = pd.read_csv(result.tables_dir / "comparisons.csv")
    assert {"diff", "diff_ci_low", "diff_ci_high", "p_value"} <= set(comparisons.columns)
    meta = json.loads((result.html.parent / "report.json").read_text())
    assert meta["profile"] == "smoke" and meta["items"] == SAMPLE_SIZE and set(meta["seconds"]) == {p.stem for p in result.executed}


def test_a_second_run_reuses_the_embedding_cache(smoke_report):
    _, base = smoke_report
    first = pd.read_csv(base / "out" / "tables" / "embeddings.csv")
    assert (first["embedded now"] + first["from cache"] == SAMPLE_SIZE).all()
    again = run_report("smoke", out=base / "again", workdir=base / "work", sample_size=SAMPLE_SIZE, notebooks=["01"], progress=False, log=lambda line: None)
    second = pd.read_csv(again.tables_dir / "embeddings.csv")
    assert (second["embedded now"] == 0).all() and (second["from cache"] == SAMPLE_SIZE).all()


def _notebook(path: Path, *sources: str) -> Path:
    cells = [nbformat.v4.new_markdown_cell("# 00 · Broken on purpose")]
    params = nbformat.v4.new_code_cell("profile = 'smoke'\nfigures_dir = 'figures'")
    params.metadata["tags"] = ["parameters"]
    cells.append(params)
    cells += [nbformat.v4.new_code_cell(s) for s in sources]
    nbformat.write(nbformat.v4.new_notebook(cells=cells), path)
    return path


def test_a_failing_cell_exits_non_zero_naming_notebook_and_cell(tmp_path, capsys):
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    _notebook(notebooks / "00_fine.ipynb", "x = 1")
    _notebook(notebooks / "01_broken.ipynb", "x = 1", "y = {}\ny['missing_key'] + 1")
    code = main([
        "report", "--profile", "smoke", "--sample-size", "20", "--notebooks-dir", str(notebooks),
        "--out", str(tmp_path / "out"), "--workdir", str(tmp_path / "work"), "--quiet",
    ])
    err = capsys.readouterr().err
    assert code == 1
    assert "notebook 01_broken.ipynb failed at cell 4 (`y = {}`)" in err
    assert "KeyError" in err and "missing_key" in err
    assert (tmp_path / "out" / "notebooks" / "01_broken.ipynb").is_file()  # kept, with the traceback
    assert not (tmp_path / "out" / "report.html").exists()


def test_notebook_error_message():
    exc = NotebookError("03_x.ipynb", 7, "rows = f()", "ValueError: bad", Path("/o/03_x.ipynb"))
    assert str(exc) == "notebook 03_x.ipynb failed at cell 7 (`rows = f()`): ValueError: bad; the executed notebook with the traceback is /o/03_x.ipynb"


def test_unknown_notebook_selection_is_refused(tmp_path, capsys):
    assert main(["report", "--notebooks", "42", "--out", str(tmp_path / "o")]) == 2
    assert "no notebook 42" in capsys.readouterr().err


@pytest.fixture
def siglip_missing():
    from vrec_utils.models.availability import check_availability

    if check_availability("siglip-base").startswith("yes"):
        pytest.skip("siglip-base weights are in the hub cache here")


def test_missing_weights_stop_in_seconds_without_fallback(siglip_missing, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(profiles.PROFILES, "article", profiles.Profile("article", ("tiny-siglip", "siglip-base"), "test", True))
    code = main(["report", "--profile", "article", "--no-fallback", "--sample-size", "20", "--out", str(tmp_path / "o"), "--workdir", str(tmp_path / "w")])
    err = capsys.readouterr().err
    assert code == 2 and "profile 'article' cannot run here" in err and "siglip-base" in err


def test_fallback_to_offline_is_noted(siglip_missing, sample_catalog, tmp_path, monkeypatch):
    monkeypatch.setitem(profiles.PROFILES, "article", profiles.Profile("article", ("siglip-base",), "test", True))
    monkeypatch.setitem(profiles.PROFILES, "offline", profiles.Profile("offline", ("tiny-siglip",), "offline stand-in"))
    resolved = profiles.resolve_profile("article", sample_catalog.head(20), tmp_path)
    assert resolved.fell_back and resolved.name == "offline" and resolved.models == ["tiny-siglip"]
    assert resolved.notes and "fell back to the 'offline' profile" in resolved.notes[0]


def test_context_helpers_on_the_smoke_run(smoke_report):
    """What the notebooks call, checked on the report's own cache: same-backend agreement is
    exact, recommendation rows come in the article's order, queries are diverse."""
    _, base = smoke_report
    ctx = notebook.prepare(None, "smoke", base / "work", models=["tiny-openclip", "tiny-siglip"], sample_size=SAMPLE_SIZE, progress=False)
    agreement = ctx.backend_agreement("faiss", n_queries=10, k=5, filter_column="subCategory")
    assert list(agreement["filter"]) == ["none", "subCategory"] * 2 and (agreement["overlap@5"] == 1.0).all()
    query = ctx.pick_query({"articleType": "Tshirts"})
    rows = ctx.recommendation_rows(query, 5, filter_column="subCategory")
    assert list(rows) == ["tiny-openclip", "tiny-openclip + subCategory filter", "tiny-siglip"]
    assert all(query not in set(frame["item_id"]) for frame in rows.values())
    filtered = rows["tiny-openclip + subCategory filter"]
    assert (ctx.catalog.items.loc[filtered["item_id"], "subCategory"] == ctx.catalog.items.at[query, "subCategory"]).all()
    picks = ctx.pick_queries(3, "articleType")
    assert len(set(ctx.catalog.items.loc[picks, "articleType"])) == 3
    assert ctx.column("subCategory", "articleType") == "subCategory" and ctx.column("nope", "articleType") == "articleType"


def test_open_catalog_samples_by_id_hash(sample_catalog):
    a = notebook.open_catalog(sample_catalog, 50, seed=0)
    b = notebook.open_catalog(sample_catalog.subset(sample_catalog.ids[::-1]), 50, seed=0)
    assert len(a) == 50 and set(a.ids) == set(b.ids)  # row order does not matter
    assert set(notebook.open_catalog(sample_catalog, 50, seed=1).ids) != set(a.ids)
    assert notebook.open_catalog(sample_catalog, None) is sample_catalog
    with pytest.raises(ValueError, match="at least 10"):
        notebook.open_catalog(sample_catalog, 3)


def test_profiles_and_names(tmp_path):
    assert set(profiles.list_profiles()["profile"]) == {"article", "offline", "smoke"}
    assert profiles.get_profile("article").models == ("resnet50", "siglip-base")
    with pytest.raises(KeyError, match="profiles: article, offline, smoke"):
        profiles.get_profile("fast")
    model_dir = tmp_path / "run" / "model"
    model_dir.mkdir(parents=True)
    (model_dir / "vrec_model.json").write_text(json.dumps({"family": "mini-siglip", "base": "mini-siglip", "config": {"eval_fraction": 0.5, "split_seed": 3}}))
    assert profiles.display_name(f"local:{tmp_path / 'run'}") == "mini-siglip fine-tuned"
    (model_dir / "vrec_model.json").write_text(json.dumps({"family": "mini-siglip", "base": "mini-siglip", "recipe": {"name": "alpha-mix"}}))
    assert profiles.display_name(f"local:{tmp_path / 'run'}") == "mini-siglip fine-tuned (alpha-mix)"  # the recipe shown
    assert profiles.display_name("efficientnet-lite0") == "efficientnet-lite0"


def test_training_split_follows_the_fine_tuned_model(sample_catalog, tmp_path):
    from vrec_utils.catalog import split_catalog

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "vrec_model.json").write_text(json.dumps({"family": "mini-siglip", "config": {"eval_fraction": 0.5, "split_seed": 3}}))
    assert notebook.training_split(["efficientnet-lite0"], sample_catalog) is None
    split = notebook.training_split(["efficientnet-lite0", f"local:{model_dir}"], sample_catalog)
    assert split == split_catalog(sample_catalog, 0.5, 3)


def test_out_folder_never_overwrites_the_source_notebooks(tmp_path, capsys):
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    source = _notebook(notebooks / "00_fine.ipynb", "x = 1")
    before = source.read_bytes()
    assert main(["report", "--profile", "smoke", "--notebooks-dir", str(notebooks), "--out", str(tmp_path), "--quiet"]) == 2
    assert "would overwrite the source notebooks" in capsys.readouterr().err
    assert source.read_bytes() == before


def test_resolving_a_profile_trains_only_when_asked(sample_catalog, tmp_path):
    """The offline profile's fine-tuned model is looked up, not trained, unless the caller asks
    (vrec report and notebook.prepare do)."""
    with pytest.raises(profiles.ProfileUnavailableError, match="no mini-SigLIP fine-tuned on .* trains it once"):
        profiles.resolve_profile("offline", sample_catalog.head(40), tmp_path / "work", progress=False)
    assert not (tmp_path / "work" / "finetune").exists()


def test_notebooks_declare_the_common_parameters_once():
    """Each numbered notebook's parameters cell takes the shared declaration and reassigns none
    of its names (a notebook that redefined `k` would silently drift from the others)."""
    import ast

    from vrec_utils.notebook import NotebookParameters

    shared = set(NotebookParameters.names())
    for path in list_notebooks():
        nb = nbformat.read(path, as_version=4)
        cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
        tree = ast.parse(cell.source)
        imports = [n for n in tree.body if isinstance(n, ast.ImportFrom) and n.module == "vrec_utils.notebook.parameters"]
        assert imports and imports[0].names[0].name == "*", path.name
        assigned = {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
        assert not assigned & shared, f"{path.name} redeclares {sorted(assigned & shared)}"


def test_notebook_parameters_read_from_a_namespace():
    from vrec_utils.notebook import NotebookParameters
    from vrec_utils.notebook import parameters as shared

    namespace = {name: getattr(shared, name) for name in shared.__all__}
    namespace.update(k=10, profile="smoke", unrelated=1)
    params = NotebookParameters.from_namespace(namespace)
    assert (params.k, params.profile, params.workdir) == (10, "smoke", "../work")
    assert set(shared.__all__) == set(NotebookParameters.names())


def test_report_passes_an_interaction_log_to_the_notebooks(tmp_path, monkeypatch, capsys):
    """`vrec report --interactions` reaches the notebooks as an absolute path (they run in
    notebooks/, not where the command was typed); a missing file stops before any notebook runs."""
    from vrec_utils import report as report_module
    from vrec_utils.cli import main

    calls = []

    def fake_run_report(**kwargs):
        calls.append(kwargs)
        raise report_module.NotebookError("08_decision", None, "", "stopped by the test", None)

    monkeypatch.setattr(report_module, "run_report", fake_run_report)
    monkeypatch.chdir(tmp_path)
    assert main(["report", "--interactions", "missing.csv", "--out", str(tmp_path / "r")]) == 2
    assert "--interactions: no file missing.csv" in capsys.readouterr().err
    assert not calls
    (tmp_path / "clicks.csv").write_text("query_id,item_id\na,b\n")
    main(["report", "--interactions", "clicks.csv", "--out", str(tmp_path / "r")])
    assert calls[0]["parameters"]["interactions"] == str(tmp_path / "clicks.csv")
