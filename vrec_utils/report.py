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

The tables, sentences and figures the notebooks show are :mod:`vrec_utils.notebook.prose`'s.
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
from typing import Any, ClassVar

from .data import REPO_ROOT
from .notebook import NotebookParameters, open_catalog
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
    papermill_log = logging.getLogger("papermill")
    declared_elsewhere = _SharedParameters()
    papermill_log.addFilter(declared_elsewhere)
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
    finally:
        papermill_log.removeFilter(declared_elsewhere)


class _SharedParameters(logging.Filter):
    """Papermill infers a notebook's parameters from its parameters cell and warns about any other
    it is passed; the shared ones come from ``import *`` of :mod:`vrec_utils.notebook.parameters`,
    which it cannot see. A truly unknown parameter still warns."""

    _names: ClassVar[frozenset[str]] = frozenset(f"Passed unknown parameter: {name}" for name in NotebookParameters.names())

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() not in self._names


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
    figures_dir, tables_dir, executed_dir = _clear_output(out, chosen)
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
    executed, seconds = _run_notebooks(chosen, executed_dir, injected, timeout=timeout, progress=progress, say=say)
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


def _clear_output(out: Path, chosen: Sequence[Path]) -> tuple[Path, Path, Path]:
    """The figures, tables and executed-notebooks folders of ``out``, emptied of an earlier
    report's files (only the kinds of files a report writes)."""
    figures_dir, tables_dir, executed_dir = out / "figures", out / "tables", out / "notebooks"
    if executed_dir.resolve() in {p.parent.resolve() for p in chosen}:
        raise ValueError(f"--out {out} would overwrite the source notebooks in {executed_dir}; choose another folder")
    for directory, pattern in ((figures_dir, "*.png"), (tables_dir, "*.csv"), (executed_dir, "*.ipynb")):
        directory.mkdir(parents=True, exist_ok=True)
        for stale in directory.glob(pattern):
            stale.unlink()
    for stale in (out / "report.html", out / "report.json"):
        stale.unlink(missing_ok=True)  # a failed run must not leave an older report looking current
    return figures_dir, tables_dir, executed_dir


def _run_notebooks(chosen: Sequence[Path], executed_dir: Path, injected: Mapping[str, Any], *, timeout: int, progress: bool, say) -> tuple[list[Path], dict[str, float]]:
    """Execute the notebooks in order in one private kernel spec; the executed copies and seconds each."""
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
    return executed, seconds


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
