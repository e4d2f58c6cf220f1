"""Product catalogs: load, validate and split.

Two layouts are understood:

* the Fashion Product Images layout: a folder with ``styles.csv`` and ``images/<id>.jpg``
  (``productDisplayName`` becomes the title);
* a generic CSV with columns ``id,image`` (image path relative to the CSV's folder, or a URI:
  ``file://``, ``s3://``, ``gs://``, see :mod:`vrec_utils.image_files`), any label columns and an
  optional ``title``. A folder holding ``catalog.csv`` is read the same way. Local paths and
  ``file://`` URIs must stay inside the catalog's folder; object-storage URIs are checked when
  extraction reads them (unreadable ones go to ``skipped.csv``).

Every value is read as a string with ``keep_default_na=False``: the literal ``NA`` is a value
(fashion-small has 91 ``usage == "NA"`` rows), not a missing one.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .image_files import is_uri, local_path

FASHION_TITLE_COLUMN = "productDisplayName"
FASHION_LABEL_COLUMNS = (
    "gender",
    "masterCategory",
    "subCategory",
    "articleType",
    "baseColour",
    "season",
    "year",
    "usage",
)
RESERVED_COLUMNS = ("id", "image", "title")


class CatalogError(ValueError):
    """The catalog cannot be used as given; the message says what to fix."""


@dataclass(frozen=True)
class CatalogReport:
    """What validation found. Problems that lose no data are reported, not raised."""

    n_rows: int
    missing_files: tuple[str, ...] = ()
    escaping_paths: tuple[str, ...] = ()
    empty_titles: int = 0
    #: the image path of each row of ``escaping_paths``, as written in the catalog
    escaping_images: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not (self.missing_files or self.escaping_paths)

    def summary(self) -> str:
        lines = [f"{self.n_rows} items"]
        if self.missing_files:
            lines.append(
                f"{len(self.missing_files)} image file(s) missing (kept in the catalog, skipped at "
                f"extraction): {_preview(self.missing_files)}"
            )
        if self.escaping_paths:
            lines.append(
                f"{len(self.escaping_paths)} row(s) refused because their image path leaves the "
                f"catalog folder: {_preview(self.escaping_paths)}"
            )
        if self.empty_titles:
            lines.append(f"{self.empty_titles} item(s) without a title")
        return "; ".join(lines)

    def refused_rows(self) -> dict[str, str]:
        """Every row refused at loading (not in the catalog), by id, with the reason: what
        extraction writes into ``skipped.csv`` next to the unreadable images."""
        images = self.escaping_images or ("?",) * len(self.escaping_paths)
        return {
            item_id: f"refused: image path {image!r} leaves the catalog folder"
            for item_id, image in zip(self.escaping_paths, images)
        }


def _preview(ids: tuple[str, ...], n: int = 5) -> str:
    head = ", ".join(ids[:n])
    return head + (f", ... (+{len(ids) - n} more)" if len(ids) > n else "")


@dataclass(frozen=True)
class Catalog:
    """A validated catalog. ``items`` is indexed by the string item id and has the columns
    ``image`` (absolute path or URI), ``title`` (may be empty) and the label columns."""

    items: pd.DataFrame
    root: Path
    source: Path
    label_columns: tuple[str, ...]
    report: CatalogReport = field(compare=False)

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def ids(self) -> list[str]:
        return self.items.index.tolist()

    def __len__(self) -> int:
        return len(self.items)

    def image_path(self, item_id: str) -> Path | str:
        """The item's image: a local ``Path``, or the URI string (``s3://...``) as the catalog gives it."""
        image = self.items.at[self.require_id(item_id), "image"]
        return image if is_uri(image) else Path(image)

    def require_id(self, item_id: str | int) -> str:
        key = str(item_id)
        if key not in self.items.index:
            raise KeyError(f"item id {key!r} is not in catalog {self.name!r} ({len(self)} items)")
        return key

    def require_column(self, column: str) -> str:
        if column not in self.items.columns or column in ("image",):
            available = ", ".join(c for c in self.items.columns if c != "image")
            raise CatalogError(f"column {column!r} is not in catalog {self.name!r}; available: {available}")
        return column

    def fingerprint(self) -> str:
        """The catalog's one identity: the file that lists it (resolved, so a relative and an
        absolute path agree; two CSVs in one folder differ) and its item ids, in order (a subset
        differs from the whole). It names the catalog's view in the embedding store, its saved
        indexes and its fine-tuning runs."""
        h = hashlib.sha256(str(self.source.resolve()).encode())
        h.update(b"\0" + "\n".join(self.items.index).encode())
        return h.hexdigest()[:12]

    def subset(self, ids: list[str] | pd.Index) -> "Catalog":
        return Catalog(self.items.loc[list(ids)], self.root, self.source, self.label_columns, self.report)

    def head(self, n: int) -> "Catalog":
        return self.subset(self.items.index[:n])


def load_catalog(path: str | os.PathLike) -> Catalog:
    """Load and validate a catalog from a folder or a CSV file (see the module docstring)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CatalogError(f"catalog path {str(path)!r} does not exist")
    if path.is_dir():
        if (path / "styles.csv").is_file():
            return _load_fashion(path)
        if (path / "catalog.csv").is_file():
            return _load_generic(path / "catalog.csv")
        raise CatalogError(
            f"{str(path)!r} holds neither styles.csv (Fashion Product Images layout) nor catalog.csv "
            "(generic layout with columns id,image)"
        )
    return _load_generic(path)


def _read_csv(csv_path: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise CatalogError(f"cannot parse {str(csv_path)!r}: {exc}") from exc


def _load_fashion(root: Path) -> Catalog:
    df = _read_csv(root / "styles.csv")
    if "id" not in df.columns:
        raise CatalogError(f"{root / 'styles.csv'} has no 'id' column; columns: {', '.join(df.columns)}")
    df = df.copy()
    df["image"] = "images/" + df["id"] + ".jpg"
    df["title"] = df[FASHION_TITLE_COLUMN] if FASHION_TITLE_COLUMN in df.columns else ""
    labels = tuple(c for c in df.columns if c not in (*RESERVED_COLUMNS, FASHION_TITLE_COLUMN))
    return _validate(df, root, root / "styles.csv", labels)


def _load_generic(csv_path: Path) -> Catalog:
    df = _read_csv(csv_path)
    missing = [c for c in ("id", "image") if c not in df.columns]
    if missing:
        raise CatalogError(
            f"{str(csv_path)!r} lacks column(s) {', '.join(missing)}; a generic catalog needs id,image "
            f"(found: {', '.join(df.columns)})"
        )
    if "title" not in df.columns:
        df = df.assign(title="")
    labels = tuple(c for c in df.columns if c not in RESERVED_COLUMNS)
    return _validate(df, csv_path.parent, csv_path, labels)


def _validate(df: pd.DataFrame, root: Path, source: Path, labels: tuple[str, ...]) -> Catalog:
    df["id"] = df["id"].str.strip()
    if (df["id"] == "").any():
        rows = (np.flatnonzero(df["id"] == "") + 2).tolist()
        raise CatalogError(f"{source}: empty id on line(s) {rows[:10]}")
    dup = df["id"][df["id"].duplicated(keep=False)]
    if len(dup):
        raise CatalogError(
            f"{source}: {dup.nunique()} duplicate id(s), e.g. {_preview(tuple(dup.unique()))}; ids must be unique"
        )
    root_resolved = root.resolve()
    absolute, escaping, escaping_images, missing = [], [], [], []
    for item_id, rel in zip(df["id"], df["image"]):
        local = local_path(rel) if is_uri(rel) else rel
        if local is None:
            absolute.append(rel)  # object storage: not checked here (a request per item); extraction reports what is unreadable
            continue
        candidate = (root_resolved / local).resolve()
        if not candidate.is_relative_to(root_resolved):
            escaping.append(item_id)
            escaping_images.append(rel)
            absolute.append("")
            continue
        absolute.append(rel if is_uri(rel) else str(candidate))  # a file:// URI stays one (read through fsspec)
        if not candidate.is_file():
            missing.append(item_id)
    df = df.assign(image=absolute)
    if escaping:
        df = df[~df["id"].isin(set(escaping))]
    report = CatalogReport(
        n_rows=len(df),
        missing_files=tuple(missing),
        escaping_paths=tuple(escaping),
        escaping_images=tuple(escaping_images),
        empty_titles=int((df["title"].str.strip() == "").sum()),
    )
    items = df.set_index("id")
    ordered = ["image", "title", *labels]
    return Catalog(items[ordered], root_resolved, source.resolve(), labels, report)


# ---------------------------------------------------------------------------------------- splits


@dataclass(frozen=True)
class Split:
    """Item ids assigned to "train" (fine-tuning) and "eval" (reported evaluation).

    Assignment hashes each id with the seed, so it does not depend on row order and an item
    keeps its side when the catalog grows.
    """

    train: tuple[str, ...]
    eval: tuple[str, ...]
    seed: int
    eval_fraction: float

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"seed": self.seed, "eval_fraction": self.eval_fraction, "train": list(self.train), "eval": list(self.eval)}
        path.write_text(json.dumps(payload))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Split":
        data = json.loads(Path(path).read_text())
        return cls(tuple(data["train"]), tuple(data["eval"]), int(data["seed"]), float(data["eval_fraction"]))


def hash_unit_interval(ids: list[str] | pd.Index, salt: str) -> np.ndarray:
    """A uniform number in [0, 1) per id, fixed by (salt, id)."""
    return np.array(
        [int.from_bytes(hashlib.sha256(f"{salt}:{i}".encode()).digest()[:8], "big") / 2**64 for i in ids]
    )


def split_catalog(catalog: Catalog, eval_fraction: float = 0.25, seed: int = 0) -> Split:
    """Deterministic split of a catalog's ids into train and eval."""
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    ids = catalog.items.index
    is_eval = hash_unit_interval(ids, f"split-{seed}") < eval_fraction
    return Split(tuple(ids[~is_eval]), tuple(ids[is_eval]), seed, eval_fraction)
