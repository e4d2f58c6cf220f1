"""The training loop: :func:`finetune` trains one run and returns a :class:`FinetuneResult`.

It trains on the catalog's *train* split only (the reported evaluation split is never seen),
carves a validation part out of it to choose the epoch and the output mix, checkpoints every
epoch (a killed run resumes), and saves a model folder that the registry loads as ``local:DIR``.
Between epochs the run is a :class:`LoopState` (history, steps, best epoch, time, stop flag) plus
the tensors of an :class:`Optimisation` (model, loss, AdamW, schedule): exactly what a checkpoint holds.

Randomness is explicit: epoch ``e`` shuffles with a generator seeded by ``(seed, e)`` and runs
under a forked torch RNG seeded the same way, so a resumed run retraces an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from ..catalog import Catalog
from ..models import resolve_device
from ..models._common import torch_load_trusted
from ..models.local import local_model_name
from ..store import DEFAULT_WORKDIR
from .config import FinetuneConfig
from .loss import SigmoidLoss, sigmoid_loss
from .pair_models import PairModel, create_pair_model
from .pairs import PairSet, make_pairs
from .validation import (
    BestEpoch,
    choose_alpha,
    label_ndcg,
    update_best,
    val_labels,
    val_loss,
)

CHECKPOINT = "last.pt"
VAL_NDCG_MAX_ITEMS = 5000  # validation nDCG uses at most this many items (a seeded subset): memory is quadratic


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the base learning rate at optimizer step ``step`` (0-based)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class FinetuneResult:
    """What a run produced.

    ``history`` has one row per epoch: ``epoch``, ``step`` (optimizer steps so far),
    ``train_loss`` (mean of the epoch's step losses), ``train_probe_loss`` and ``val_loss`` (the
    model at the end of the epoch on a fixed train subset and on the validation pairs, batched
    alike, so the two compare), ``val_ndcg@5`` (image-to-image among the validation items, alpha
    = 1), ``lr``, ``temperature`` (exp t'), ``bias`` and ``seconds``. ``steps`` has one row per
    optimizer step (step, epoch, loss, lr). ``alpha_table``: validation nDCG@5 per output mix.
    """

    model_name: str
    model_dir: Path
    out: Path
    base: str
    config: FinetuneConfig
    history: pd.DataFrame
    steps: pd.DataFrame
    best_epoch: int
    alpha: float | None
    alpha_table: pd.DataFrame
    n_train: int
    n_val: int
    n_no_title: int
    n_excluded: int
    n_dropped: int
    train_seconds: float
    feature_seconds: float
    resumed_from_epoch: int
    info: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        alpha = f", alpha={self.alpha:g}" if self.alpha is not None else ""
        last = self.history.iloc[-1] if len(self.history) else None
        val = ""
        if last is not None and "val_ndcg@5" in self.history and self.history["val_ndcg@5"].notna().any():
            val = f", val nDCG@5 {self.history['val_ndcg@5'].max():.4f}"
        resumed = f", resumed after epoch {self.resumed_from_epoch}" if self.resumed_from_epoch else ""
        return (
            f"{self.base} fine-tuned on {self.n_train} pairs ({self.n_val} val, {self.n_no_title} without title "
            f"skipped, {self.n_excluded} excluded, {self.n_dropped} without features): best epoch "
            f"{self.best_epoch}/{len(self.history)}{val}{alpha}; train {self.train_seconds:.1f} s, features "
            f"{self.feature_seconds:.1f} s{resumed} -> {self.model_name}"
        )


# =================================================================================== the loop


@dataclass
class LoopState:
    """A run's progress after its last finished epoch (the tensors live in :class:`Optimisation`)."""

    history: list[dict[str, Any]] = field(default_factory=list)  # one row per epoch
    steps: list[dict[str, Any]] = field(default_factory=list)  # one row per optimizer step
    best: BestEpoch = field(default_factory=BestEpoch)
    train_seconds: float = 0.0
    stopped: bool = False  # early stopping fired (patience): a resumed run trains no further

    def to_checkpoint(self) -> dict[str, Any]:
        return {
            "history": self.history, "steps": self.steps, "best": self.best.to_dict(),
            "train_seconds": self.train_seconds, "stopped": self.stopped,
        }  # fmt: skip

    @classmethod
    def from_checkpoint(cls, checkpoint: dict[str, Any]) -> LoopState:
        return cls(
            history=checkpoint["history"], steps=checkpoint["steps"], best=BestEpoch(**checkpoint["best"]),
            train_seconds=float(checkpoint["train_seconds"]), stopped=checkpoint.get("stopped", False),
        )  # fmt: skip


@dataclass
class Optimisation:
    """What trains and how: the pair model, the loss (its t' and b learn too), AdamW and its schedule."""

    model: PairModel
    loss_fn: SigmoidLoss
    params: list[nn.Parameter]  # the model's trainable parameters (the loss's come on top)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    steps_per_epoch: int
    total_steps: int

    def state_dicts(self) -> dict[str, Any]:
        return {
            "model": self.model.train_state(), "loss": self.loss_fn.state_dict(),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
        }  # fmt: skip

    def load(self, checkpoint: dict[str, Any]) -> None:
        self.model.load_train_state(checkpoint["model"])
        self.loss_fn.load_state_dict(checkpoint["loss"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])


@dataclass(frozen=True)
class _Positions:
    """Rows of the pair model the loop trains on and scores (train rows first, then validation)."""

    train: np.ndarray
    val: np.ndarray
    ndcg: np.ndarray  # validation rows for nDCG@5 and alpha (a seeded subset beyond VAL_NDCG_MAX_ITEMS)
    labels: np.ndarray | None  # label of each ``ndcg`` row; None: select by validation loss
    train_probe: np.ndarray  # a fixed train subset as large as ``val``, scored like it every epoch


@dataclass(frozen=True)
class _Run:
    """The fixed facts of one :func:`finetune` call."""

    catalog: Catalog
    base: str
    out: Path
    workdir: Path
    config: FinetuneConfig
    device: torch.device
    pairs: PairSet
    start_epoch: int  # epochs already done by a resumed run


def finetune(
    catalog: Catalog,
    base: str = "mini-siglip",
    out: str | os.PathLike = "runs/finetune",
    *,
    workdir: str | os.PathLike = DEFAULT_WORKDIR,
    config: FinetuneConfig | None = None,
    device: str | torch.device | None = "auto",
    resume: bool = True,
    overwrite: bool = False,
    warm_cache: bool = True,
    progress: bool = True,
    warm_start: str | os.PathLike | None = None,
) -> FinetuneResult:
    """Fine-tune ``base`` with the sigmoid loss on ``catalog``'s train-split (image, title) pairs.

    Writes into ``out``: ``model/`` (the model: ``local:OUT/model``), ``config.json``,
    ``split.json``, ``history.csv``, ``steps.csv``, ``result.json`` and
    ``checkpoints/last.pt`` (after every epoch). With ``resume`` a run whose checkpoint holds
    the same base, catalog and config continues after its last finished epoch; a checkpoint of
    a different run is an error unless ``overwrite``. The checkpoint key holds the fields
    that decide the weights only (:meth:`FinetuneConfig.training_dict`), so a run that differs in
    how the coefficient is chosen continues a finished training: in ``out`` itself, or in the
    run folder ``warm_start`` (read, never written) when ``out`` has no checkpoint.
    """
    config = config or FinetuneConfig()
    out = Path(out).expanduser().resolve()
    workdir = Path(workdir)
    device = resolve_device(device)
    run_key = {"base": base, "catalog": catalog.fingerprint(), "config": config.training_dict()}
    ckpt_path = out / "checkpoints" / CHECKPOINT
    checkpoint = _load_checkpoint(ckpt_path, run_key, resume, overwrite)
    if checkpoint is None and warm_start is not None:
        checkpoint = _warm_start_checkpoint(Path(warm_start) / "checkpoints" / CHECKPOINT, run_key)

    pairs = make_pairs(catalog, config)
    model = create_pair_model(base, catalog, pairs, config, workdir, device, progress, warm_cache)
    rows = _positions(model, catalog, config)
    opt = _optimisation(model, base, config, device)
    state, start_epoch = LoopState(), 0
    if checkpoint is not None:
        opt.load(checkpoint)
        state, start_epoch = LoopState.from_checkpoint(checkpoint), int(checkpoint["epoch"])
    run = _Run(catalog, base, out, workdir, config, device, pairs, start_epoch)

    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps({"base": base, **config.to_dict()}, indent=2))
    bar = tqdm(
        total=opt.total_steps, initial=run.start_epoch * opt.steps_per_epoch, desc=f"finetune {base}", unit="step",
        disable=not progress, file=sys.stderr,
    )
    for epoch in range(run.start_epoch + 1, config.epochs + 1):
        if state.stopped:
            break
        _train_epoch(epoch, opt, state, rows, config, bar)
        _save_checkpoint(ckpt_path, run_key, epoch, opt, state)
    bar.close()
    return _finish(run, opt, state, rows, warm_cache)


def _positions(model: PairModel, catalog: Catalog, config: FinetuneConfig) -> _Positions:
    n_train = model.n_train
    train_pos = np.arange(n_train)
    val_pos = np.arange(n_train, len(model.ids))
    if n_train < 2:
        raise ValueError(f"only {n_train} training pair(s) have image and text features; nothing to train")
    ndcg_pos = val_pos
    if len(val_pos) > VAL_NDCG_MAX_ITEMS:
        ndcg_pos = np.sort(np.random.default_rng(config.seed).choice(val_pos, VAL_NDCG_MAX_ITEMS, replace=False))
    labels = val_labels(catalog, [model.ids[p] for p in ndcg_pos], config.label, stacklevel=4)  # warn at finetune's caller
    # A fixed train subset as large as the validation set, scored like it after every epoch:
    # the sigmoid loss grows with the batch size, so only equal batches compare train with val.
    subset = np.random.default_rng(config.seed).permutation(n_train)[: max(len(val_pos), 2)]
    return _Positions(train_pos, val_pos, ndcg_pos, labels, np.sort(train_pos[subset]))


def _optimisation(model: PairModel, base: str, config: FinetuneConfig, device: torch.device) -> Optimisation:
    loss_fn = SigmoidLoss()
    if config.loss_init == "model":
        init = model.initial_logit_params()
        if init is None:
            raise ValueError(f"loss_init='model' needs a base with a logit scale and bias (SigLIP); {base!r} has none")
        loss_fn = SigmoidLoss(*init)
    loss_fn.to(device)
    params = model.trainable_parameters()
    if not params:
        raise ValueError(f"trainable={config.trainable!r} selects no parameters of {base!r}")
    groups = [{k: v for k, v in g.items() if k != "lr_scale"} | {"lr": config.lr * g["lr_scale"]} for g in model.parameter_groups(config)]
    optimizer = torch.optim.AdamW([*groups, {"params": list(loss_fn.parameters()), "weight_decay": 0.0}], lr=config.lr)
    steps_per_epoch = math.ceil(model.n_train / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, config.warmup_steps, config.schedule)
    )
    return Optimisation(model, loss_fn, params, optimizer, scheduler, steps_per_epoch, total_steps)


def _train_epoch(epoch: int, opt: Optimisation, state: LoopState, rows: _Positions, config: FinetuneConfig, bar: tqdm) -> None:
    """One epoch of steps, then its history row, the best epoch and the early-stop flag in ``state``."""
    model, loss_fn = opt.model, opt.loss_fn
    started = time.perf_counter()
    epoch_losses = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_epoch_seed(config.seed, epoch))
        order = torch.randperm(len(rows.train), generator=torch.Generator().manual_seed(_epoch_seed(config.seed, epoch))).numpy()
        model.train_mode(True)
        model.start_epoch(epoch)
        for batch in model.batches(rows.train[order], config.batch_size):
            img, txt, reg = model.forward_train(batch)
            if img.shape[0] < 2:
                continue  # a lone last pair has no negative
            loss = sigmoid_loss(img, txt, loss_fn.t_prime, loss_fn.bias, normalize=False)
            if reg is not None:  # the recipe's regularisers, already weighted (PairModel.forward_train)
                loss = loss + reg
            opt.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(opt.params + list(loss_fn.parameters()), config.grad_clip)
            opt.optimizer.step()
            opt.scheduler.step()
            value = float(loss.detach())
            epoch_losses.append(value)
            state.steps.append({"step": len(state.steps) + 1, "epoch": epoch, "loss": value, "lr": opt.scheduler.get_last_lr()[0]})
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{value:.4f}")
        model.train_mode(False)
    state.train_seconds += time.perf_counter() - started
    row = {
        "epoch": epoch,
        "step": len(state.steps),
        "train_loss": float(np.mean(epoch_losses)) if epoch_losses else float("nan"),
        "train_probe_loss": val_loss(model, rows.train_probe, loss_fn, config.batch_size),
        "val_loss": val_loss(model, rows.val, loss_fn, config.batch_size),
        "val_ndcg@5": label_ndcg(model.image_embeddings(rows.ndcg), rows.labels) if rows.labels is not None else float("nan"),
        "lr": opt.scheduler.get_last_lr()[0],
        "temperature": float(loss_fn.t_prime.detach().exp()),
        "bias": float(loss_fn.bias.detach()),
        "seconds": round(time.perf_counter() - started, 3),
    }
    state.history.append(row)
    improved = update_best(state.best, row, config, rows.labels is not None, model, loss_fn)
    state.stopped = config.patience is not None and not improved and state.best.since >= config.patience


def _finish(run: _Run, opt: Optimisation, state: LoopState, rows: _Positions, warm_cache: bool) -> FinetuneResult:
    """Restore the best epoch, choose alpha, save the model and the run's files."""
    model, loss_fn, best, config = opt.model, opt.loss_fn, state.best, run.config
    if best.state is not None:
        model.load_train_state(best.state)
        loss_fn.load_state_dict(best.loss_state)
    gate = model.fit_gate(rows.train, rows.val)
    alpha, alpha_table = choose_alpha(model, rows.ndcg, rows.labels, config)
    model_dir = run.out / "model"
    hist = pd.DataFrame(state.history)
    steps = pd.DataFrame(state.steps, columns=["step", "epoch", "loss", "lr"])
    info = _run_info(run, opt, state, rows)
    info["recipe"] = recipe_record(config, alpha, model, len(rows.ndcg))
    if gate is not None:
        info["recipe"]["gate"] = gate
    # how search serves it (vrec_utils.models.local.query_router), recorded so it never follows from code changes
    info["serving"] = config.serving_mode() if gate is not None else "served"
    extra = {"base": run.base, "config": config.to_dict(), "run": info, "recipe": info["recipe"], "serving": info["serving"]}
    model.save(model_dir, alpha=alpha, loss=loss_fn, extra=extra)
    (model_dir / "config.json").write_text(json.dumps({"base": run.base, **config.to_dict()}, indent=2))
    run.pairs.save(model_dir / "split.json")
    run.pairs.save(run.out / "split.json")
    hist.to_csv(run.out / "history.csv", index=False)
    steps.to_csv(run.out / "steps.csv", index=False)
    alpha_table.to_csv(run.out / "alpha.csv", index=False)
    model_name = local_model_name(model_dir)
    warmed = model.warm_cache(model_name, model_dir, run.workdir, run.catalog, run.device) if warm_cache else 0
    info["warmed_cache_items"] = warmed
    (run.out / "result.json").write_text(json.dumps({**info, "model": model_name, "alpha": alpha}, indent=2))
    return FinetuneResult(
        model_name=model_name,
        model_dir=model_dir,
        out=run.out,
        base=run.base,
        config=config,
        history=hist,
        steps=steps,
        best_epoch=int(best.epoch),
        alpha=alpha,
        alpha_table=alpha_table,
        n_train=len(rows.train),
        n_val=len(rows.val),
        n_no_title=run.pairs.n_no_title,
        n_excluded=run.pairs.n_excluded,
        n_dropped=model.n_dropped,
        train_seconds=state.train_seconds,
        feature_seconds=float(getattr(model, "feature_seconds", 0.0)),
        resumed_from_epoch=run.start_epoch,
        info=info,
    )


def recipe_record(config: FinetuneConfig, coefficient: float | None, model: PairModel, n_val: int) -> dict[str, Any]:
    """What the saved model records about its recipe and the set that chose its coefficient."""
    in_domain = {"catalog": "validation part of the train split", "n_items": n_val, "label": config.label}
    chose = "fixed by config.alpha" if config.alpha is not None else ("shift selection half + validation" if model.selection else "validation")
    return {
        "name": config.recipe, "mix": config.mix, "coefficient": coefficient, "distill": config.distill, "l2sp": config.l2sp,
        "image_head": config.image_head, "image_rank": config.image_rank, "trainable": config.trainable, "shift_tolerance": config.shift_tolerance,
        "probe_epochs": config.probe_epochs, "augment_views": config.augment_views, "chosen_by": chose,
        "selection": {"in_domain": in_domain, **({"shift": model.selection.describe()} if model.selection else {})},
    }  # fmt: skip


def _run_info(run: _Run, opt: Optimisation, state: LoopState, rows: _Positions) -> dict[str, Any]:
    """What ``result.json`` and the saved model record about the run."""
    return {
        "base": run.base,
        "catalog": str(run.catalog.root),
        "catalog_fingerprint": run.catalog.fingerprint(),
        "config_digest": run.config.digest(),
        "best_epoch": int(state.best.epoch),
        "epochs_run": len(state.history),
        "n_train": len(rows.train),
        "n_val": len(rows.val),
        "n_no_title": run.pairs.n_no_title,
        "n_excluded": run.pairs.n_excluded,
        "n_capped": run.pairs.n_capped,
        "n_dropped": opt.model.n_dropped,
        "train_seconds": round(state.train_seconds, 3),
        "device": str(run.device),
        "torch_threads": torch.get_num_threads(),
        **opt.model.describe(),
    }


def _epoch_seed(seed: int, epoch: int) -> int:
    return int.from_bytes(hashlib.sha256(f"finetune-{seed}-{epoch}".encode()).digest()[:6], "big")


def _save_checkpoint(path: Path, run_key: dict[str, Any], epoch: int, opt: Optimisation, state: LoopState) -> None:
    """The run after ``epoch``, written atomically (a killed write leaves the previous checkpoint)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"run": run_key, "epoch": epoch, **opt.state_dicts(), **state.to_checkpoint()}
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def _warm_start_checkpoint(path: Path, run_key: dict[str, Any]) -> dict[str, Any] | None:
    """Another run's checkpoint when it trained exactly what ``run_key`` trains, else None."""
    if not path.is_file():
        return None
    checkpoint = torch_load_trusted(path, f"delete {str(path)!r} (a damaged checkpoint of another run)")
    return checkpoint if checkpoint.get("run") == run_key else None


def _load_checkpoint(path: Path, run_key: dict[str, Any], resume: bool, overwrite: bool) -> dict[str, Any] | None:
    """The checkpoint of this run to resume from, or None; deletes one that is not to be resumed."""
    if not path.exists():
        return None
    if overwrite and not resume:  # starting over: the old checkpoint is never read
        path.unlink()
        return None
    checkpoint = torch_load_trusted(
        path, f"delete {str(path)!r} or rerun with --no-resume to start the run over (or use another --out)"
    )
    if checkpoint.get("run") == run_key and resume:
        return checkpoint
    if checkpoint.get("run") != run_key and not overwrite:
        raise ValueError(
            f"{path.parent.parent} holds a fine-tuning run of a different base, catalog or config; "
            "use another --out folder, or --overwrite to start over there"
        )
    path.unlink()
    return None
