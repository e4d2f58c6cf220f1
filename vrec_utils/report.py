"""The report: run the numbered notebooks headless, then export one HTML file with the figures.

:func:`run_report` resolves the profile once (a profile that cannot load falls back to
``offline`` and the note goes at the top of the report), executes ``notebooks/NN_*.ipynb`` in
order with papermill, injecting the same parameters into each (catalog, workdir, profile, the
resolved models, figures and tables folders, ...), and writes::

    <out>/report.html          every notebook, one after the other, with a table of contents
    <out>/figures/*.png        the figures, as the notebooks saved them
    <out>/tables/*.csv         the tables (evaluation, extraction timings, ...)
    <out>/notebooks/*.ipynb    the executed notebooks
    <out>/report.json          what ran, with which models, how long each notebook took

A cell that raises stops the run with :class:`NotebookError`, which names the notebook, the
cell (number and first line) and the exception; the executed notebook with the traceback is
kept. The kernel is this interpreter's (a private kernelspec pointing at ``sys.executable``), so
the notebooks see the same packages as the ``vrec`` command.

The module also holds the small presentation helpers the notebooks call: :func:`publish` (save
a figure and display the saved PNG), :func:`evaluation_table` and the sentences computed from
numbers (:func:`comparison_markdown`, :func:`per_category_markdown`), so that written
observations hold for whichever profile ran.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from .data import REPO_ROOT
from .notebook import open_catalog
from .profiles import display_name, get_profile, resolve_profile
from .store import DEFAULT_WORKDIR

NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
NOTEBOOK_PATTERN = re.compile(r"^(\d\d)_[\w.-]+\.ipynb$")
KERNEL_NAME = "vrec-python"
DEFAULT_CELL_TIMEOUT = 1800  # seconds for one cell


class NotebookError(RuntimeError):
    """A notebook cell failed; the message names the notebook, the cell and the exception."""
    def __init__(self, notebook: str, cell: int | None, source_line: str, error: str, executed: Path | None) -> None:
        where = f"cell {cell}" if cell is not None else "startup"
        line = f" (`{source_line}`)" if source_line else ""
        kept = f"; the executed notebook with the traceback is {executed}" if executed else ""
        super().__init__(f"notebook {notebook} failed at {where}{line}: {error}{kept}")
        self.notebook = notebook
        self.cell = cell
        self.source_line = source_line
        self.error = error
        self.executed = executed


@dataclass(frozen=True)
class ReportResult:
    html: Path
    figures_dir: Path
    tables_dir: Path
    executed: list[Path]
    profile: str
    requested_profile: str
    models: list[str]
    notes: list[str]
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def figures(self) -> list[Path]:
        return sorted(self.figures_dir.glob("*.png"))

    def summary(self) -> str:
        total = sum(self.seconds.values())
        lines = [
            f"report: {self.html}",
            f"figures: {self.figures_dir} ({len(self.figures)} PNG)",
            f"tables: {self.tables_dir}",
            f"profile: {self.profile}" + (f" (fell back from {self.requested_profile})" if self.profile != self.requested_profile else ""),
            f"notebooks: {len(self.executed)} in {total:.0f} s",
        ]
        return "\n".join(lines)


# ------------------------------------------------------------------------------- notebooks


def list_notebooks(notebooks_dir: str | os.PathLike | None = None, select: Sequence[str] | None = None) -> list[Path]:
    """The numbered notebooks (``NN_name.ipynb``) in order; ``select`` keeps those whose number
    or name is listed (``["00", "03_recommendations"]``)."""
    directory = Path(notebooks_dir) if notebooks_dir is not None else NOTEBOOKS_DIR
    found = sorted(p for p in directory.glob("*.ipynb") if NOTEBOOK_PATTERN.match(p.name))
    if not found:
        raise FileNotFoundError(f"no numbered notebooks (NN_name.ipynb) in {directory}")
    if not select:
        return found
    wanted = [s.strip().removesuffix(".ipynb") for s in select if s.strip()]
    chosen = [p for p in found if any(p.stem == w or p.stem.split("_", 1)[0] == w for w in wanted)]
    unknown = [w for w in wanted if not any(p.stem == w or p.stem.split("_", 1)[0] == w for p in found)]
    if unknown:
        raise ValueError(f"no notebook {', '.join(unknown)} in {directory}; notebooks: {', '.join(p.stem for p in found)}")
    return chosen


@contextlib.contextmanager
def _private_kernel(env: Mapping[str, str]) -> Iterator[str]:
    """A kernelspec running ``sys.executable`` (found first on JUPYTER_PATH), and ``env`` set for
    the kernel processes; both are undone afterwards."""
    with tempfile.TemporaryDirectory(prefix="vrec-kernel-") as tmp:
        spec_dir = Path(tmp) / "kernels" / KERNEL_NAME
        spec_dir.mkdir(parents=True)
        spec = {
            "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": f"vrec ({sys.executable})",
            "language": "python",
        }
        (spec_dir / "kernel.json").write_text(json.dumps(spec))
        saved = {key: os.environ.get(key) for key in ("JUPYTER_PATH", *env)}
        os.environ["JUPYTER_PATH"] = os.pathsep.join(filter(None, [tmp, saved["JUPYTER_PATH"]]))
        os.environ.update(env)
        try:
            yield KERNEL_NAME
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def execute_notebook(
    notebook: Path,
    output: Path,
    parameters: Mapping[str, Any],
    *,
    kernel_name: str,
    timeout: int = DEFAULT_CELL_TIMEOUT,
    progress: bool = True,
) -> None:
    """Run one notebook with papermill; a failing cell raises :class:`NotebookError`."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    output.parent.mkdir(parents=True, exist_ok=True)
    try:
        papermill.execute_notebook(
            str(notebook),
            str(output),
            parameters=dict(parameters),
            kernel_name=kernel_name,
            language="python",
            cwd=str(notebook.parent),
            progress_bar=progress and {"desc": notebook.stem, "leave": False} or False,
            execution_timeout=timeout,
            request_save_on_cell_execute=False,
            log_output=False,
            extra_arguments=["--IPKernelApp.log_level=ERROR"],  # no start-up chatter on the terminal
        )
    except PapermillExecutionError as exc:
        cell, line = _source_cell(notebook, exc.source)
        raise NotebookError(notebook.name, cell, line, f"{exc.ename}: {exc.evalue}", output) from None
    except Exception as exc:  # kernel death, timeout: no cell source to point at
        cell = _failed_cell(output)
        raise NotebookError(notebook.name, cell, "", f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}", output if output.exists() else None) from exc


def _source_cell(notebook: Path, source: str) -> tuple[int | None, str]:
    """1-based number of the code cell whose source is ``source`` in the original notebook (as
    JupyterLab counts cells: markdown included), and that source's first non-empty line."""
    import nbformat

    first = next((ln.strip() for ln in source.splitlines() if ln.strip()), "")
    cells = nbformat.read(notebook, as_version=4).cells
    for number, cell in enumerate(cells, start=1):
        if cell.cell_type == "code" and cell.source.strip() == source.strip():
            return number, first
    return None, first


def _failed_cell(output: Path) -> int | None:
    import nbformat

    if not output.exists():
        return None
    cells = nbformat.read(output, as_version=4).cells
    for number, cell in enumerate(cells, start=1):
        if cell.get("metadata", {}).get("papermill", {}).get("status") in ("running", "failed"):
            return number
    return None


# ------------------------------------------------------------------------------- the report


def run_report(
    profile: str = "offline",
    catalog: str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
    workdir: str | os.PathLike = DEFAULT_WORKDIR,
    *,
    notebooks: Sequence[str] | None = None,
    notebooks_dir: str | os.PathLike | None = None,
    fallback: bool = True,
    sample_size: int | None = None,
    parameters: Mapping[str, Any] | None = None,
    timeout: int = DEFAULT_CELL_TIMEOUT,
    progress: bool = True,
    log=None,
    weights: Mapping[str, str] | None = None,
) -> ReportResult:
    """Run the numbered notebooks headless and write ``<out>/report.html`` (see the module docstring).

    ``out`` defaults to ``reports/<profile>``. ``parameters`` are extra notebook parameters
    (``k``, ``label_column``, ...). ``log`` receives one line per step (default: stderr).
    ``weights``: local weights per model (``{"siglip-base": DIR, "resnet50": FILE}``), named in
    the report's header like every model's weights.
    """
    import tqdm  # noqa: F401  (imported before TQDM_DISABLE is set for the kernels, so our own bars stay)

    say = log or (lambda line: print(line, file=sys.stderr, flush=True))
    started = time.perf_counter()
    chosen = list_notebooks(notebooks_dir, notebooks)
    out = Path(out if out is not None else Path("reports") / profile).resolve()
    workdir = Path(workdir).resolve()
    figures_dir, tables_dir, executed_dir = out / "figures", out / "tables", out / "notebooks"
    if executed_dir.resolve() in {p.parent.resolve() for p in chosen}:
        raise ValueError(f"--out {out} would overwrite the source notebooks in {executed_dir}; choose another folder")
    # Stale output of an earlier report in the same folder goes (only the kinds of files we write).
    for directory, pattern in ((figures_dir, "*.png"), (tables_dir, "*.csv"), (executed_dir, "*.ipynb")):
        directory.mkdir(parents=True, exist_ok=True)
        for stale in directory.glob(pattern):
            stale.unlink()
    for stale in (out / "report.html", out / "report.json"):
        stale.unlink(missing_ok=True)  # a failed run must not leave an older report looking current
    catalog_path = str(Path(catalog).resolve()) if catalog not in (None, "") else None
    opened = open_catalog(catalog_path, sample_size)

    say(f"vrec report: profile {profile!r} on {opened.name} ({len(opened)} items); resolving models ...")
    resolved = resolve_profile(profile, opened, workdir, fallback=fallback, progress=progress, weights=weights, train=True)
    for note in resolved.notes:
        say(f"note: {note}")
    say(f"models: {', '.join(resolved.models)}")
    injected = {
        "catalog": catalog_path,
        "workdir": str(workdir),
        "profile": resolved.name,
        "models": list(resolved.models),
        "profile_notes": list(resolved.notes),
        "fallback": False,
        "sample_size": sample_size,
        "figures_dir": str(figures_dir),
        "tables_dir": str(tables_dir),
        "progress": False,
        "weights": {m: w for m, w in (weights or {}).items() if m in resolved.models},
        **dict(parameters or {}),
    }
    seconds: dict[str, float] = {}
    executed: list[Path] = []
    # No progress bars inside the notebooks (the HTML would keep them) and no warning that
    # ipywidgets is missing for them; papermill's per-cell bar shows progress on the terminal.
    kernel_env = {"TQDM_DISABLE": "1", "PYTHONWARNINGS": "ignore::DeprecationWarning,ignore:IProgress not found"}
    with _private_kernel(kernel_env) as kernel:
        for number, notebook in enumerate(chosen, start=1):
            t0 = time.perf_counter()
            say(f"[{number}/{len(chosen)}] {notebook.stem} ...")
            target = executed_dir / notebook.name
            execute_notebook(notebook, target, injected, kernel_name=kernel, timeout=timeout, progress=progress)
            seconds[notebook.stem] = round(time.perf_counter() - t0, 2)
            executed.append(target)
            say(f"[{number}/{len(chosen)}] {notebook.stem} done in {seconds[notebook.stem]:.1f} s")
    html = out / "report.html"
    write_html(executed, html, title_info={
        "profile": resolved.name,
        "requested_profile": resolved.requested,
        "models": resolved.models,
        "notes": resolved.notes,
        "weights": resolved.weights,
        "catalog": f"{opened.name} ({len(opened)} items)",
        "seconds": seconds,
    })
    result = ReportResult(html, figures_dir, tables_dir, executed, resolved.name, resolved.requested, list(resolved.models), list(resolved.notes), seconds)
    (out / "report.json").write_text(json.dumps({
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "profile": resolved.name,
        "requested_profile": resolved.requested,
        "models": resolved.models,
        "notes": resolved.notes,
        "weights": resolved.weights,
        "catalog": catalog_path or "bundled sample",
        "items": len(opened),
        "seconds": seconds,
        "total_seconds": round(time.perf_counter() - started, 2),
        "html": str(html),
        "figures": [p.name for p in result.figures],
    }, indent=2))
    return result


# ------------------------------------------------------------------------------- HTML


class _DropMessage(logging.Filter):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def write_html(executed: Sequence[Path], html: Path, title_info: Mapping[str, Any]) -> Path:
    """Concatenate executed notebooks into one notebook (title, notes, table of contents, then
    every notebook's cells minus the parameter cells) and export it with nbconvert."""
    import nbformat
    from nbconvert import HTMLExporter

    combined = nbformat.v4.new_notebook()
    combined.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    combined.metadata["language_info"] = {"name": "python"}
    parts = [(path, nbformat.read(path, as_version=4)) for path in executed]
    combined.cells.append(nbformat.v4.new_markdown_cell(_title_markdown(parts, title_info)))
    for n, (path, nb) in enumerate(parts):
        combined.cells.append(nbformat.v4.new_markdown_cell(f'<a id="{_anchor(path)}"></a>\n\n---'))
        for i, cell in enumerate(nb.cells):
            tags = set(cell.get("metadata", {}).get("tags", []))
            if tags & {"parameters", "injected-parameters"}:
                continue
            cell = nbformat.from_dict(dict(cell))
            cell["id"] = f"nb{n}-c{i}"
            cell["metadata"] = {k: v for k, v in cell.get("metadata", {}).items() if k in ("tags",)}
            combined.cells.append(cell)
    exporter = HTMLExporter(template_name="lab")
    exporter.exclude_input_prompt = True
    exporter.exclude_output_prompt = True
    # the lab template has no alt text for figures (each is described by the Markdown around it):
    # nbconvert's warning about it, once per report, says nothing a user can act on
    no_alt_warning = _DropMessage("Alternative text is missing")
    exporter.log.addFilter(no_alt_warning)
    try:
        body, _resources = exporter.from_notebook_node(combined, resources={"metadata": {"name": "vrec report"}})
    finally:
        exporter.log.removeFilter(no_alt_warning)
    html.parent.mkdir(parents=True, exist_ok=True)
    html.write_text(body, encoding="utf-8")
    return html


def _anchor(path: Path) -> str:
    return f"nb-{path.stem}"


def _notebook_title(nb) -> str:
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            for line in cell.source.splitlines():
                if line.startswith("# "):
                    return line[2:].strip()
    return ""


def _title_markdown(parts, info: Mapping[str, Any]) -> str:

    lines = ["# vrec report: CNN vs vision-language embeddings for similar items and visual search", ""]
    notes = list(info.get("notes") or [])
    if info.get("profile") != info.get("requested_profile"):
        lines += [f"> **Fallback:** profile `{info.get('requested_profile')}` was requested; this report ran `{info.get('profile')}`.", ""]
    lines += [f"> **Note:** {note}" + "\n" for note in notes]
    lines += [
        f"- **Profile:** `{info.get('profile')}`: {get_profile(str(info.get('profile'))).description}",
        "- **Models:** " + ", ".join(f"`{display_name(m)}`" for m in info.get("models", [])),
        *(f"- **Weights of `{display_name(m)}`:** {w}" for m, w in (info.get("weights") or {}).items()),
        f"- **Catalog:** {info.get('catalog')}",
        f"- **Generated:** {_dt.datetime.now().strftime('%Y-%m-%d %H:%M')} by `vrec report`; figures are also saved as PNG in `figures/` next to this file.",
        "",
        "## Contents",
        "",
    ]
    seconds = info.get("seconds", {})
    for path, nb in parts:
        title = _notebook_title(nb) or path.stem
        took = f" ({seconds[path.stem]:.0f} s)" if path.stem in seconds else ""
        lines.append(f"1. [{title}](#{_anchor(path)}){took}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------- notebook helpers


def publish(fig, name: str, figures_dir: str | os.PathLike, width: int | None = None):
    """Save ``fig`` as ``<figures_dir>/<name>.png`` and return it as an IPython image of the saved
    file (what the notebook and the HTML show is exactly the PNG)."""
    from IPython.display import Image

    from .plots import save_figure

    path = save_figure(fig, name, figures_dir)
    image = Image(filename=str(path), embed=True)
    if width is None:
        from PIL import Image as PILImage

        with PILImage.open(path) as im:
            width = min(im.width, 1100)  # pixel for pixel, at most the width of the report's page
    image.width = width
    return image


def evaluation_table(result, metric: str = "ndcg@5", others: Sequence[str] | None = None, include_pca: bool = True) -> pd.DataFrame:
    """One row per (model, setting): ``metric`` with its 95% CI, the other metrics' means and the
    number of queries. Columns: model, setting, <metric>, ci95_low, ci95_high, <others...>, n_queries.
    ``include_pca=False`` leaves out the PCA-reduced rows (see :func:`dims_table`)."""

    summary = result.summary()
    if not include_pca:
        summary = summary[~summary["setting"].str.startswith("pca")]
    main = summary[summary["metric"] == metric]
    if main.empty:
        raise ValueError(f"metric {metric!r} was not computed; computed: {', '.join(summary['metric'].unique())}")
    table = main[["model", "setting", "mean", "ci_low", "ci_high", "n_queries"]].rename(
        columns={"mean": metric, "ci_low": "ci95_low", "ci_high": "ci95_high"}
    )
    others = [m for m in (others if others is not None else summary["metric"].unique()) if m != metric]
    if others:
        wide = summary[summary["metric"].isin(others)].pivot_table(index=["model", "setting"], columns="metric", values="mean", sort=False)
        table = table.merge(wide[[m for m in others if m in wide.columns]].reset_index(), on=["model", "setting"], how="left")
    table = table[["model", "setting", metric, "ci95_low", "ci95_high", *[m for m in others if m in table.columns], "n_queries"]]
    table["model"] = table["model"].map(display_name)
    return table.round(4).reset_index(drop=True)


def _fmt_p(p: float) -> str:
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


def comparison_markdown(comparisons: pd.DataFrame, metric: str = "ndcg@5"):
    """Sentences, computed from the paired comparisons, that say who wins and whether the 95%
    interval of the difference excludes zero (an IPython Markdown object)."""
    from IPython.display import Markdown

    rows = comparisons[comparisons["metric"] == metric] if "metric" in comparisons else comparisons
    if rows.empty:
        return Markdown("_Only one model: there is no paired comparison to make._")
    out = []
    for row in rows.itertuples(index=False):
        a = f"`{display_name(row.model_a)}` ({row.setting_a})"
        b = f"`{display_name(row.model_b)}` ({row.setting_b})"
        sign = "+" if row.diff >= 0 else ""
        rel = "" if pd.isna(row.rel_improvement_pct) else f", {sign}{row.rel_improvement_pct:.1f}% relative"
        if row.diff_ci_low > 0 or row.diff_ci_high < 0:
            verdict = f"the 95% interval excludes zero, so {b if row.diff > 0 else a} is better on these queries"
        else:
            verdict = "the 95% interval includes zero, so these queries do not separate the two"
        out.append(
            f"- {b} vs {a}: {metric} {row.mean_b:.3f} vs {row.mean_a:.3f}, difference {sign}{row.diff:.3f} "
            f"(95% CI {row.diff_ci_low:+.3f} to {row.diff_ci_high:+.3f}; paired permutation {_fmt_p(row.p_value)}{rel}); "
            f"{verdict}."
        )
    return Markdown("\n".join(out))


def per_category_markdown(frame: pd.DataFrame, delta: str, category: str, n: int = 3, min_queries: int = 3):
    """The ``n`` largest per-category gains and losses in one sentence (categories with at least
    ``min_queries`` queries)."""
    from IPython.display import Markdown

    data = frame[frame["n_queries"] >= min_queries].sort_values(delta)
    if data.empty:
        return Markdown(f"_No {category} has {min_queries} or more queries._")
    gains = data[data[delta] > 0].tail(n).iloc[::-1]
    losses = data[data[delta] < 0].head(n)
    share = float((data[delta] > 0).mean())
    return Markdown(
        f"Among the {len(data)} {category} values with at least {min_queries} queries, {share:.0%} gain. "
        f"Largest gains: {_list_changes(gains, category, delta)}. Largest losses: {_list_changes(losses, category, delta)}."
    )


def _list_changes(part: pd.DataFrame, category: str, delta: str) -> str:
    return ", ".join(f"{r[category]} ({r[delta]:+.3f}, {int(r['n_queries'])} queries)" for _, r in part.iterrows()) or "none"


def save_table(frame: pd.DataFrame, name: str, tables_dir: str | os.PathLike) -> pd.DataFrame:
    """Write ``frame`` as ``<tables_dir>/<name>.csv`` and return it (to display)."""
    directory = Path(tables_dir)
    directory.mkdir(parents=True, exist_ok=True)
    frame.to_csv(directory / f"{name}.csv", index=False)
    return frame


def extraction_markdown(timings: pd.DataFrame):
    """What the extraction step did, computed from :meth:`RunContext.extract`'s table."""
    from IPython.display import Markdown

    lines = []
    for row in timings.to_dict(orient="records"):
        if row["embedded now"] == 0:
            lines.append(f"- `{row['model']}`: all {row['from cache']} items came from the cache (nothing recomputed).")
        else:
            lines.append(
                f"- `{row['model']}`: {row['embedded now']} items embedded in {row['extract s']:.1f} s "
                f"({row['images/s']} images/s), {row['from cache']} from the cache."
            )
    return Markdown("\n".join(lines))


def labels_of(catalog, item_id: str | None, columns: Sequence[str]) -> dict[str, str]:
    """``{column: value}`` of a catalog item for the ``columns`` the catalog has (``{}`` for None)."""
    if item_id is None:
        return {}
    return {c: str(catalog.items.at[str(item_id), c]) for c in dict.fromkeys(columns) if c in catalog.items.columns}


def describe_item(catalog, item_id: str, columns: Sequence[str] = (), note: str = "", image: str | os.PathLike | None = None):
    """One line naming a catalog item: id, title and the given labels (or the ``image`` file when
    the query is an image from outside the catalog)."""
    from IPython.display import Markdown

    if image:
        return Markdown(f"Query image: `{image}` (not a catalog item).")
    labels = ", ".join(f"{c}: {v}" for c, v in labels_of(catalog, item_id, columns).items())
    title = str(catalog.items.at[str(item_id), "title"]) or "(no title)"
    extra = f", {note}" if note else ""
    return Markdown(f"Query: item `{item_id}`{extra}: **{title}**" + (f" ({labels})." if labels else "."))


def results_table(rows: Mapping[str, pd.DataFrame], catalog, columns: Sequence[str] = ("title",)) -> pd.DataFrame:
    """The rows of results as one table (row, rank, item_id, score and catalog ``columns``)."""
    frames = []
    for name, frame in rows.items():
        ids = [str(i) for i in frame["item_id"]]
        part = pd.DataFrame({"row": name, "rank": frame["rank"].to_numpy() if "rank" in frame else range(1, len(ids) + 1), "item_id": ids, "score": frame["score"].to_numpy()})
        for column in columns:
            if column in catalog.items.columns:
                part[column] = catalog.items.loc[ids, column].to_numpy()
        frames.append(part)
    return pd.concat(frames, ignore_index=True).round({"score": 4})


def elasticsearch_url() -> str | None:
    """``VREC_ES_URL`` when set (the Elasticsearch server the live comparison uses)."""
    return os.environ.get("VREC_ES_URL") or None


def elasticsearch_skipped():
    from IPython.display import Markdown

    return Markdown(
        "`VREC_ES_URL` is not set, so the Elasticsearch comparison was skipped. Start a server with "
        "`docker compose up -d elasticsearch` (or a throwaway one with `bash scripts/es-test-node.sh start`, "
        "which prints its URL) and set `VREC_ES_URL` (e.g. `http://localhost:9200`) to run it."
    )


def catalog_markdown(catalog):
    """Size, validation report and label columns of a catalog (or of a sample of it)."""
    from IPython.display import Markdown

    size = f"{len(catalog)} items"
    if len(catalog) < catalog.report.n_rows:
        size += f" (a seeded sample of the {catalog.report.n_rows} in `{catalog.source}`)"
    problems = catalog.report.summary().split("; ", 1)[1:] if not catalog.report.ok or catalog.report.empty_titles else []
    labels = ", ".join(f"`{c}`" for c in catalog.label_columns)
    text = f"**{catalog.name}**: {size}. Label columns: {labels}."
    if problems:
        text += f" Validation: {problems[0]}."
    return Markdown(text)


def result_hits(rows: Mapping[str, pd.DataFrame], catalog, target: Mapping[str, str]) -> pd.DataFrame:
    """Per row of results: how many results match each ``column: value`` of ``target``."""
    table = []
    for name, frame in rows.items():
        ids = [str(i) for i in frame["item_id"]]
        entry = {"row": name, "results": len(ids)}
        for column, value in target.items():
            if column in catalog.items.columns:
                entry[f"{column} = {value}"] = int((catalog.items.loc[ids, column] == value).sum())
        table.append(entry)
    return pd.DataFrame(table)


def hits_markdown(rows: Mapping[str, pd.DataFrame], catalog, target: Mapping[str, str]):
    """One sentence per row: "<row>: 3/5 articleType = Dresses, 4/5 gender = Women"."""
    from IPython.display import Markdown

    if not target:
        return Markdown("_The query has no labels (an image from outside the catalog): no hits to count._")
    table = result_hits(rows, catalog, target)
    lines = []
    for record in table.to_dict(orient="records"):
        counts = [f"{record[c]}/{record['results']} with {c}" for c in table.columns if c not in ("row", "results")]
        lines.append(f"- **{record['row']}**: " + ", ".join(counts) + ".")
    return Markdown("\n".join(lines))


def evaluation_markdown(result) -> Any:
    """The evaluation protocol in numbers: queries, candidates, what was left out and why."""
    from IPython.display import Markdown

    rep = result.report
    no_rel = rep.get("no_relevant", {})
    no_rel_count = no_rel.get("count", 0) if isinstance(no_rel, Mapping) else no_rel
    parts = [
        f"**{rep.get('queries', result.n_queries)} queries** searched among **{rep.get('candidates', len(result.candidate_ids))} candidates**"
        f" ({rep.get('eval_items', '?')} evaluation items",
        f"{rep.get('duplicates_excluded', 0)} byte-identical duplicate images excluded",
        f"{no_rel_count} items without any relevant candidate kept as distractors only).",
    ]
    notes = result.config.get("notes") or []
    text = ", ".join(parts[:2]) + ", " + parts[2]
    text += f" Relevance: {result.config.get('relevance', '')}; gain: {result.config.get('gain_formula', '')}."
    text += f" Intervals: {int(result.config.get('confidence', 0.95) * 100)}% {result.config.get('ci_method', '')} bootstrap over queries ({result.config.get('n_bootstrap')} resamples)."
    text += "".join(f"\n- {note}" for note in notes)
    return Markdown(text)


def comparison_table(comparisons: pd.DataFrame) -> pd.DataFrame:
    """The paired comparisons with display names, rounded, most useful columns first."""
    columns = ["model_a", "setting_a", "model_b", "setting_b", "metric", "mean_a", "mean_b", "diff", "diff_ci_low",
               "diff_ci_high", "p_value", "rel_improvement_pct", "rel_ci_low", "rel_ci_high", "n_queries"]  # fmt: skip
    table = comparisons[[c for c in columns if c in comparisons.columns]].copy()
    for column in ("model_a", "model_b"):
        table[column] = table[column].map(display_name)
    return table.round(4)


def per_category_table(result, column: str, metric: str = "ndcg@5", min_queries: int = 1) -> pd.DataFrame:
    """Mean ``metric`` per ``column`` value for each model (display names) and ``delta`` = second
    model minus first; ``attrs["delta_label"]`` says which."""

    frame = result.per_category(column, metric)
    frame = frame[frame["n_queries"] >= min_queries]
    models = [m for m in result.models if m in frame.columns]
    renamed = frame.rename(columns={m: display_name(m) for m in models})
    if len(models) >= 2:
        renamed = renamed.rename(columns={f"{models[1]} - {models[0]}": "delta"})
        keep = [column, "n_queries", *[display_name(m) for m in models], "delta"]
        renamed = renamed[keep].sort_values("delta", ascending=False, ignore_index=True)
        renamed.attrs["delta_label"] = f"Δ {metric}: {display_name(models[1])} − {display_name(models[0])}"
    return renamed.round(4)


def dims_table(result, metric: str = "ndcg@5") -> pd.DataFrame:
    """``metric`` against embedding dimensions per model (PCA rows + the full dimension)."""
    curve = result.dims_curve(metric)
    curve = curve.rename(columns={"mean": str(metric)})
    curve["model"] = curve["model"].map(display_name)
    return curve.round(4)
