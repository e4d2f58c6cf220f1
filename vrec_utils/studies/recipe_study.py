"""Both sides of a fine-tune: the in-domain change and the change on a real shifted catalog.

* :func:`both_sides`: the paired nDCG@5 difference of a tuned model against its base, on the
  catalog's evaluation split and on the *reported half* of a shifted catalog (split by sender,
  :func:`vrec_utils.train.shift_halves`: the selection half may have chosen the coefficient);
* :func:`routed_in_domain`: the in-domain change of a gated model as ``vrec search`` serves it
  (routed by each query's gate) next to its served vectors' change (the numbers :func:`both_sides` gives);
* :func:`verdict`: "gains in-domain and holds under shift" only when both intervals say so;
* :func:`run_recipe_study`: every recipe of :data:`vrec_utils.train.RECIPES` on the same splits
  and seeds, one table (``benchmarks/bench_finetune_recipes.py``).

The intervals are the evaluation package's paired bootstrap (:meth:`EvaluationResult.compare`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..catalog import Catalog, Split, load_catalog, split_catalog
from ..evaluation import evaluate_models
from ..evaluation.config import UNFILTERED
from ..models.local import inside_gate
from ..store import DEFAULT_WORKDIR, load_embeddings
from ..train import (
    RECIPES,
    FinetuneConfig,
    default_run_dir,
    ensure_finetuned,
    extract_finetuned_embeddings,
    load_result,
    recipe_config,
    shift_halves,
)

REPO = Path(__file__).resolve().parents[2]
#: The real shifted catalog (real photos by 90 senders; labels, no titles), when present.
DEFAULT_SHIFT_CATALOG = REPO.parent / "shared" / "data" / "clothing-dev"
HOLD_MARGIN = 0.01  # "holds under shift": the change's 95% CI lower bound is above -HOLD_MARGIN
SIDE_COLUMNS = ["side", "set", "base ndcg@5", "tuned ndcg@5", "diff", "ci_low", "ci_high", "p_value", "n_queries"]


def default_shift_catalog() -> Path | None:
    """``../shared/data/clothing-dev`` next to the repository when it is there, else None."""
    return DEFAULT_SHIFT_CATALOG if (DEFAULT_SHIFT_CATALOG / "catalog.csv").is_file() else None


def _diffs(catalog: Catalog, workdir: Path, base_model: str, tuned: Sequence[str], split: Split, label: str, n_bootstrap: int) -> pd.DataFrame:
    """One row per tuned model: its paired nDCG@5 difference against ``base_model`` on ``split.eval``."""
    result = evaluate_models(catalog, workdir, [base_model, *tuned], label=label, split=split, ks=(5,), metrics=["ndcg@5"], n_bootstrap=n_bootstrap)
    return pd.concat([result.compare(base_model, t, ["ndcg@5"]) for t in tuned], ignore_index=True)


def _side_rows(frame: pd.DataFrame, side: str, name: str) -> pd.DataFrame:
    return pd.DataFrame({
        "side": side, "set": name, "base ndcg@5": frame["mean_a"], "tuned ndcg@5": frame["mean_b"], "diff": frame["diff"],
        "ci_low": frame["diff_ci_low"], "ci_high": frame["diff_ci_high"], "p_value": frame["p_value"], "n_queries": frame["n_queries"],
    })  # fmt: skip


def both_sides(
    catalog: Catalog,
    workdir: str | os.PathLike,
    tuned: str | Sequence[str],
    *,
    config: FinetuneConfig | None = None,
    shift_catalog: str | os.PathLike | Catalog | None = None,
    base_model: str = "efficientnet-lite0",
    label: str = "articleType",
    n_bootstrap: int = 2000,
    device: str | torch.device | None = "auto",
    progress: bool = False,
) -> pd.DataFrame:
    """In-domain and shifted changes of ``tuned`` (a model or several) against ``base_model``:
    rows ``side`` = in-domain (the evaluation split of ``config``) and, with a
    ``shift_catalog``, shift (its reported half by ``config.shift_group``/``shift_seed``, label
    ``config.shift_label``), each with the paired bootstrap 95% CI; ``model`` names the tuned model."""
    config = config or FinetuneConfig()
    workdir = Path(workdir)
    names = [tuned] if isinstance(tuned, str) else list(tuned)
    for name in (base_model, *names):
        extract_finetuned_embeddings(catalog, name, workdir, device=device, progress=progress)
    split = split_catalog(catalog, config.eval_fraction, config.split_seed)
    frame = _side_rows(_diffs(catalog, workdir, base_model, names, split, label, n_bootstrap), "in-domain", f"{catalog.name} evaluation split")
    frame.insert(0, "model", names)
    frames = [frame]
    if shift_catalog is not None:
        shifted = shift_catalog if isinstance(shift_catalog, Catalog) else load_catalog(shift_catalog)
        for name in (base_model, *names):
            extract_finetuned_embeddings(shifted, name, workdir, device=device, progress=progress)
        _, report = shift_halves(shifted, config.shift_group, config.shift_seed)
        diffs = _diffs(shifted, workdir, base_model, names, Split((), report, config.shift_seed, 0.5), config.shift_label, n_bootstrap)
        frame = _side_rows(diffs, "shift", f"{shifted.name} reported half ({shifted.items.loc[list(report), config.shift_group].nunique()} senders)")
        frame.insert(0, "model", names)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)[["model", *SIDE_COLUMNS]]


ROUTED = "routed by the query's gate"


def routed_in_domain(
    catalog: Catalog,
    workdir: str | os.PathLike,
    tuned: str,
    *,
    config: FinetuneConfig | None = None,
    base_model: str = "efficientnet-lite0",
    label: str = "articleType",
    n_bootstrap: int = 2000,
) -> pd.DataFrame:
    """``tuned``'s in-domain change on ``config``'s evaluation split in both serving modes: rows
    *served* (every query ranks the served vectors: :func:`both_sides`' in-domain number), *routed*
    (a query inside the model's gate ranks the served vectors, any other query ``base_model``'s, so
    its per-query nDCG@5 is the served value inside the gate and the base value outside, as
    ``vrec search`` serves it) and routed against served; each a paired bootstrap 95% CI of the same
    evaluation (one set of resamples; the columns of ``EvaluationResult.compare``), with the share of
    queries inside the gate. Embeddings must be cached."""
    config = config or FinetuneConfig()
    workdir = Path(workdir)
    split = split_catalog(catalog, config.eval_fraction, config.split_seed)
    result = evaluate_models(catalog, workdir, [base_model, tuned], label=label, split=split, ks=(5,), metrics=["ndcg@5"], n_bootstrap=n_bootstrap)
    inside = inside_gate(tuned, load_embeddings(workdir, catalog, base_model).vectors_for(list(result.query_ids)))
    served, base = result.values[(tuned, UNFILTERED)]["ndcg@5"], result.values[(base_model, UNFILTERED)]["ndcg@5"]
    routed = {(ROUTED, UNFILTERED): {"ndcg@5": np.where(inside, served, base)}}
    both = dataclasses.replace(result, values={**result.values, **routed}, dims={**result.dims, (ROUTED, UNFILTERED): result.dims[(tuned, UNFILTERED)]}, _boot=None)
    pairs = (("served", base_model, tuned), ("routed", base_model, ROUTED), ("routed vs served", tuned, ROUTED))
    frame = pd.concat([both.compare(a, b, ["ndcg@5"]).assign(mode=mode) for mode, a, b in pairs], ignore_index=True)
    frame["share inside the gate"] = float(inside.mean())
    return frame[["mode", *frame.columns.drop("mode")]]


def verdict(sides: pd.DataFrame) -> str:
    """The sentence for one model's :func:`both_sides` rows; "gains in-domain and holds under
    shift" only when the in-domain CI excludes zero from above and the shift CI's lower bound is
    above -:data:`HOLD_MARGIN`."""
    inside = sides[sides["side"] == "in-domain"].iloc[0]
    gains = inside["ci_low"] > 0
    gain_text = "gains in-domain" if gains else ("loses in-domain" if inside["ci_high"] < 0 else "no significant in-domain change")
    shift = sides[sides["side"] == "shift"]
    if shift.empty:
        return f"{gain_text}; not measured under a real shift (no shift catalog)"
    low, high = shift["ci_low"].iloc[0], shift["ci_high"].iloc[0]
    if gains and low > -HOLD_MARGIN:
        return f"gains in-domain and holds under shift (shift CI lower bound {low:+.3f} > -{HOLD_MARGIN:g})"
    hold = "holds under shift" if low > -HOLD_MARGIN else ("loses under shift" if high < 0 else f"may lose under shift (CI lower bound {low:+.3f} <= -{HOLD_MARGIN:g})")
    return f"{gain_text}, but {hold}" if gains else f"{gain_text}; {hold}"


def sides_text(sides: pd.DataFrame) -> str:
    """Plain-text lines of :func:`both_sides` (what ``vrec finetune`` prints)."""
    lines = [
        f"{r.side:9} {r.set}: {r._3:.4f} -> {r._4:.4f}, diff {r.diff:+.4f} [95% CI {r.ci_low:+.4f}, {r.ci_high:+.4f}] ({r.n_queries} queries)"
        for r in sides.itertuples(index=False)
    ]
    return "\n".join(lines + [f"verdict: {verdict(sides)}"])


@dataclass(frozen=True)
class RecipeStudy:
    """The study's table (one row per recipe) and each run's ``result.json``."""

    table: pd.DataFrame
    sides: pd.DataFrame  # both_sides rows of every recipe's model
    runs: dict[str, dict]
    alpha_tables: dict[str, pd.DataFrame] = dataclasses.field(default_factory=dict)  # each run's coefficient table (alpha.csv)

    def markdown_table(self) -> str:
        return self.table.to_markdown(index=False)


def selection_gains(alpha_table: pd.DataFrame | None, coefficient: float | None) -> dict[str, float]:
    """What chose ``coefficient``: its validation nDCG@5 gain and its selection-half change
    (NaN when the run had no selection set), both against coefficient 0 (the base model)."""
    out = {"val gain": float("nan"), "selection change": float("nan")}
    if alpha_table is None or coefficient is None or alpha_table.empty:
        return out
    at = lambda column, a: alpha_table.loc[(alpha_table["alpha"] - a).abs() < 1e-9, column].item()
    out["val gain"] = at("val_ndcg@5", coefficient) - at("val_ndcg@5", 0.0)
    if "shift_select_ndcg@5" in alpha_table:
        out["selection change"] = at("shift_select_ndcg@5", coefficient) - at("shift_select_ndcg@5", 0.0)
    return out


def loses_at_most(change, tolerance: float):
    """``change >= -tolerance``, with 1e-12 of float slack so a loss of exactly ``tolerance`` passes
    (a float or a Series; NaN never passes): the rules' tolerance test, in one place."""
    return change >= -tolerance - 1e-12


def choose_by_rule(table: pd.DataFrame, tolerance: float) -> str:
    """The study's default: among recipes whose coefficient was chosen on the shift selection half
    and loses at most ``tolerance`` there, the one with the best in-domain *validation* gain (ties:
    the earlier row). Only validation and selection-half columns are read: never the evaluation
    split's or the reported half's ("in-domain diff", "shift diff")."""
    eligible = table[table["selection change"].notna() & loses_at_most(table["selection change"], tolerance)]
    if eligible.empty:
        raise ValueError(f"no recipe chose its coefficient on the selection half within tolerance {tolerance:g}")
    return str(eligible.loc[eligible["val gain"].idxmax(), "recipe"])


def run_recipe_study(
    catalog: Catalog,
    shift_catalog: str | os.PathLike,
    workdir: str | os.PathLike = DEFAULT_WORKDIR,
    *,
    recipes: Sequence[str] | None = None,
    config: FinetuneConfig | None = None,
    base_model: str = "efficientnet-lite0",
    n_bootstrap: int = 2000,
    device: str | torch.device | None = "auto",
    progress: bool = True,
) -> RecipeStudy:
    """Train (or reuse) every recipe on the same splits and seeds and measure both sides.

    Table columns: recipe, coefficient (and what chose it), the validation gain and selection-half
    change that chose it (:func:`selection_gains`), in-domain diff vs ``base_model`` with its CI,
    shift diff (the shifted catalog's reported half) with its CI, training seconds."""
    config = config or FinetuneConfig()
    names = list(recipes or RECIPES)
    models, runs, alphas, trained = {}, {}, {}, {}
    for name in names:  # recipes that differ only in how the coefficient is chosen share one training
        recipe = recipe_config(name, config, shift_catalog)
        key = json.dumps(recipe.training_dict(), sort_keys=True)
        models[name] = ensure_finetuned(catalog, workdir, "mini-siglip", config=recipe, device=device, progress=progress, warm_start=trained.get(key))
        trained.setdefault(key, default_run_dir(workdir, catalog, "mini-siglip", recipe))
        loaded = load_result(models[name])
        runs[name], alphas[name] = loaded["result"], loaded.get("alpha")
    sides = both_sides(catalog, workdir, list(models.values()), config=config, shift_catalog=shift_catalog, base_model=base_model, n_bootstrap=n_bootstrap, device=device)
    rows = []
    for name, model in models.items():
        mine = sides[sides["model"] == model]
        inside, shift = mine[mine["side"] == "in-domain"].iloc[0], mine[mine["side"] == "shift"].iloc[0]
        recipe = runs[name].get("recipe", {})
        rows.append({
            "recipe": name, "mix": recipe.get("mix"), "coefficient": runs[name].get("alpha"), "chosen on": recipe.get("chosen_by"),
            **selection_gains(alphas[name], runs[name].get("alpha")),
            "in-domain diff": inside["diff"], "in-domain CI": f"[{inside['ci_low']:+.4f}, {inside['ci_high']:+.4f}]",
            "shift diff": shift["diff"], "shift CI": f"[{shift['ci_low']:+.4f}, {shift['ci_high']:+.4f}]",
            "train s": runs[name]["train_seconds"], "verdict": verdict(mine),
        })  # fmt: skip
    return RecipeStudy(pd.DataFrame(rows).round(4), sides, runs, {k: v for k, v in alphas.items() if v is not None})


__all__ = [
    "DEFAULT_SHIFT_CATALOG", "HOLD_MARGIN", "RecipeStudy", "both_sides", "choose_by_rule", "default_shift_catalog",
    "ROUTED", "loses_at_most", "routed_in_domain", "run_recipe_study", "selection_gains", "sides_text", "verdict",
]  # fmt: skip
