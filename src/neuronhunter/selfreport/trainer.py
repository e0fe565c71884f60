"""Training the predictor (``PredictorTrainer``): unfreezing strategies, AdamW, early stopping, resume.

*Unfreezing.* ``head``: only the readout head learns. ``last_k``: the head and the ``k`` blocks just below the read point. ``all``: every parameter.
``gradual``: the head first, then one more block from the top every ``gradual_every`` optimizer steps (ULMFiT-style
gradual unfreezing), up to ``gradual_max`` blocks. The head learns at ``lr``, model parameters at ``body_lr``.
With ``cache_frozen`` (window heads) the residual stream entering the first trainable block is computed once per
window and every step runs only the trainable blocks (the head alone: the features are cached), which makes
``head`` and ``last_k`` training several times cheaper than full forward passes.

*Determinism.* The model stays in eval mode (no dropout), the head is initialised from ``seed`` and the data order
of epoch ``e`` is a permutation drawn from ``seed`` and ``e`` alone. So a run interrupted after any step and resumed
from its checkpoint replays exactly the same optimizer steps as an uninterrupted run.

*Checkpoints.* ``checkpoints/last.safetensors`` holds every tunable parameter (head + the model parameters the
strategy can ever unfreeze), the AdamW moments and the RNG state; ``checkpoints/last.json`` the step, epoch, early
stopping state and the log rows. ``checkpoints/best.safetensors`` holds the parameters at the best validation
loss; they are restored at the end. All files are written to a temporary name and renamed.

*Logs.* ``logs/metrics.csv`` (always), TensorBoard event files under ``logs/tensorboard`` (when ``tensorboardX`` is
installed and ``tensorboard: true``), Weights & Biases only with ``wandb: true`` and ``wandb`` installed, offline
unless ``wandb_mode: online``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import RunDirError
from ..io import atomic_path, write_json
from .config import TrainingConfig
from .dataset import SplitTensors
from .predictor import ActivationPredictor, Prefix

log = logging.getLogger(__name__)

ProgressFn = Callable[[str, int, int], None]


@dataclass
class TrainResult:
    """What happened during training."""

    steps: int
    total_steps: int
    best_step: int | None
    best_val_loss: float | None
    stopped_early: bool
    interrupted: bool
    elapsed_s: float
    unfrozen: int | str
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "history"} | {
            "evaluations": [r for r in self.history if r.get("split") == "val"]}


class MetricsLogger:
    """Rows of metrics to CSV (rewritten atomically), TensorBoard and optionally Weights & Biases."""

    COLUMNS = ["step", "epoch", "split", "loss", "lr", "body_lr", "unfrozen", "pearson", "elapsed_s"]

    def __init__(self, folder: Path | None, config: TrainingConfig, *, run_name: str = "selfreport",
                 rows: list[dict[str, Any]] | None = None, purge_step: int | None = None,
                 extra: dict[str, Any] | None = None) -> None:
        self.folder = folder
        self.rows: list[dict[str, Any]] = list(rows or [])
        self.tb = None
        self.wandb = None
        if folder is None:
            return
        if config.tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                log.warning("tensorboardX is not installed; TensorBoard logs skipped (pip install tensorboardX)")
            else:
                self.tb = SummaryWriter(logdir=str(folder / "tensorboard"), purge_step=purge_step)
        if config.wandb:
            try:
                import wandb
            except ImportError:
                log.warning("wandb was requested but is not installed; logging to CSV/TensorBoard only")
            else:
                self.wandb = wandb.init(project=config.wandb_project, name=run_name, mode=config.wandb_mode,
                                        config=extra or {}, dir=str(folder), resume="allow")

    def log(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        step = int(row["step"])
        prefix = row["split"]
        for key in ("loss", "lr", "pearson", "unfrozen"):
            value = row.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                if self.tb is not None:
                    self.tb.add_scalar(f"{prefix}/{key}", value, step)
        if self.wandb is not None:
            self.wandb.log({f"{prefix}/{k}": v for k, v in row.items() if isinstance(v, (int, float))}, step=step)

    def flush(self) -> None:
        if self.folder is None:
            return
        import csv

        with atomic_path(self.folder / "metrics.csv") as tmp:
            with open(tmp, "w", newline="", encoding="utf-8") as fh:
                writer = csv.DictWriter(fh, fieldnames=self.COLUMNS, extrasaction="ignore")
                writer.writeheader()
                writer.writerows(self.rows)
        if self.tb is not None:
            self.tb.flush()

    def close(self) -> None:
        self.flush()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() < 2:
        return float("nan")
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    den = float(a.norm() * b.norm())
    return float((a * b).sum()) / den if den > 0 else float("nan")


class PredictorTrainer:
    """Trains an :class:`ActivationPredictor` (see the module docstring).

    Args:
        predictor: the predictor (its model is trained in place).
        train, val: the training and validation splits.
        config: the training section.
        out_dir: where ``checkpoints/`` and ``logs/`` go (None: nothing written, no resume).
        progress: optional ``(description, done, total)`` callback.
        run_name: a name for the logs.
    """

    def __init__(self, predictor: ActivationPredictor, train: SplitTensors, val: SplitTensors,
                 config: TrainingConfig, *, out_dir: str | Path | None = None,
                 progress: ProgressFn | None = None, run_name: str = "selfreport",
                 eval_batch_size: int = 16) -> None:
        self.p = predictor
        self.train_split = train
        self.val_split = val
        self.cfg = config
        self.out = Path(out_dir) if out_dir is not None else None
        self.progress = progress
        self.run_name = run_name
        self.eval_batch_size = eval_batch_size
        if predictor.n_items(train) == 0:
            raise RunDirError("the training split has no target tokens")
        self.max_blocks = predictor.n_blocks_below_top
        cfg = config
        self.use_prefix = cfg.cache_frozen and predictor.kind != "token"
        self._prefix: dict[tuple[str, int], Prefix] = {}
        self._checked: set[int] = set()
        self.tunable_model_names = predictor.model_param_names(self._final_unfrozen())
        self.params = predictor.named_tunable(self.tunable_model_names)
        head = [p for k, p in self.params.items() if k.startswith("head.")]
        body = [p for k, p in self.params.items() if k.startswith("model.")]
        groups = []
        if head:
            groups.append({"params": head, "lr": cfg.lr, "base_lr": cfg.lr, "name": "head"})
        if body:
            groups.append({"params": body, "lr": cfg.body_lr, "base_lr": cfg.body_lr, "name": "body"})
        self.optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay, foreach=False)
        n = predictor.n_items(train)
        batches = math.ceil(n / cfg.batch_size)
        self.steps_per_epoch = math.ceil(batches / cfg.grad_accum)
        total = self.steps_per_epoch * cfg.epochs
        self.total_steps = min(total, cfg.max_steps) if cfg.max_steps else total

    # ------------------------------------------------------------------------------------------ schedule
    def _final_unfrozen(self) -> int | str:
        cfg = self.cfg
        if cfg.unfreeze == "head":
            return 0
        if cfg.unfreeze == "all":
            return "all"
        if cfg.unfreeze == "last_k":
            return min(cfg.k, self.max_blocks)
        return min(cfg.gradual_max or self.max_blocks, self.max_blocks)

    def unfrozen_at(self, step: int) -> int | str:
        """Blocks unfrozen for optimizer step ``step`` (0-based)."""
        cfg = self.cfg
        if cfg.unfreeze != "gradual":
            return self._final_unfrozen()
        start = 1 if self.p.kind == "token" else 0
        return min(start + step // cfg.gradual_every, int(self._final_unfrozen()))

    def lr_factor(self, step: int) -> float:
        cfg = self.cfg
        factor = 1.0
        if cfg.warmup_steps and step < cfg.warmup_steps:
            factor = (step + 1) / cfg.warmup_steps
        elif cfg.schedule == "linear":
            span = max(1, self.total_steps - cfg.warmup_steps)
            factor = max(0.0, 1.0 - (step - cfg.warmup_steps) / span)
        return factor

    def epoch_order(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch)
        return torch.randperm(self.p.n_items(self.train_split), generator=g)

    # ------------------------------------------------------------------------------------------ checkpoints
    @property
    def ckpt_dir(self) -> Path | None:
        return self.out / "checkpoints" if self.out is not None else None

    def _param_tensors(self) -> dict[str, torch.Tensor]:
        return {k: p.detach().cpu().clone().contiguous() for k, p in self.params.items()}

    def _load_params(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for k, p in self.params.items():
                if k not in tensors:
                    raise RunDirError(f"checkpoint is missing {k}; was it written by another config?")
                p.copy_(tensors[k].to(p.device, p.dtype))

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        if self.ckpt_dir is None:
            return
        from safetensors.torch import save_file

        tensors = {f"param/{k}": v for k, v in self._param_tensors().items()}
        index = {id(p): i for i, p in enumerate(p for g in self.optimizer.param_groups for p in g["params"])}
        for p, st in self.optimizer.state.items():
            for key, value in st.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"optim/{index[id(p)]}/{key}"] = value.detach().cpu().clone().contiguous()
        tensors["rng/torch"] = torch.random.get_rng_state()
        with atomic_path(self.ckpt_dir / "last.safetensors") as tmp:
            save_file(tensors, str(tmp), metadata={"step": str(state["step"])})
        write_json(self.ckpt_dir / "last.json", state)

    def load_checkpoint(self) -> dict[str, Any] | None:
        if self.ckpt_dir is None or not (self.ckpt_dir / "last.json").is_file():
            return None
        from safetensors import safe_open
        from safetensors.torch import load_file

        state = json.loads((self.ckpt_dir / "last.json").read_text())
        path = self.ckpt_dir / "last.safetensors"
        with safe_open(str(path), framework="pt") as fh:
            if (fh.metadata() or {}).get("step") != str(state["step"]):
                raise RunDirError(f"{path} does not match last.json (interrupted while saving?)")
        tensors = load_file(str(path))
        self.p.set_unfrozen(self.unfrozen_at(max(0, state["step"] - 1)))
        self._load_params({k[len("param/"):]: v for k, v in tensors.items() if k.startswith("param/")})
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        sd = self.optimizer.state_dict()
        sd["state"] = {}
        for key, value in tensors.items():
            if key.startswith("optim/"):
                _, i, name = key.split("/", 2)
                sd["state"].setdefault(int(i), {})[name] = value.to(params[int(i)].device)
        self.optimizer.load_state_dict(sd)
        torch.random.set_rng_state(tensors["rng/torch"])
        return state

    # ------------------------------------------------------------------------------------------ evaluation
    def evaluate(self, prefix: Prefix | None = None) -> tuple[float, float]:
        """Mean validation loss and the Pearson correlation of the predictions with the targets."""
        report = None
        if self.progress is not None:
            report = lambda done, total: self.progress("validating", done, total)  # noqa: E731
        preds, loss = self.p.predict(self.val_split, batch_size=self.eval_batch_size, prefix=prefix,
                                     progress=report)
        y = self.val_split.target[self.val_split.selected]
        return loss, _pearson(torch.from_numpy(preds.score).float(), y)

    # ------------------------------------------------------------------------------------------ training
    def train(self, *, resume: bool = False, stop_after: int | None = None) -> TrainResult:
        """Train; with ``resume`` continue from ``checkpoints/last`` when it exists.

        Args:
            resume: continue an interrupted run from its last checkpoint.
            stop_after: stop (checkpointing) after this many optimizer steps, as if interrupted.
        """
        cfg, p = self.cfg, self.p
        t0 = time.perf_counter()
        state = {"step": 0, "epoch": 0, "pos": 0, "best_val": None, "best_step": None, "bad_evals": 0,
                 "stopped_early": False, "rows": [], "elapsed_s": 0.0}
        best: dict[str, torch.Tensor] | None = None
        if resume:
            loaded = self.load_checkpoint()
            if loaded is not None:
                state.update(loaded)
                log.info("resuming from step %d", state["step"])
                best_file = self.ckpt_dir / "best.safetensors" if self.ckpt_dir else None
                if best_file is not None and best_file.is_file():
                    from safetensors.torch import load_file

                    best = load_file(str(best_file))
        else:
            p.set_unfrozen(self.unfrozen_at(0))
        prior = float(state["elapsed_s"])  # time spent before this session (resumed runs)
        logger = MetricsLogger(self.out / "logs" if self.out else None, cfg, run_name=self.run_name,
                               rows=state["rows"], purge_step=state["step"] or None,
                               extra={"training": cfg.model_dump(mode="json"), **p.describe()})

        def run_eval(step: int, epoch: int) -> bool:
            """Evaluate, checkpoint; returns True when early stopping triggers."""
            nonlocal best
            loss, r = self.evaluate(self.prefix("val", self.prefix_start(max(0, step - 1))))
            row = {"step": step, "epoch": epoch, "split": "val", "loss": loss, "pearson": r,
                   "unfrozen": self._unfrozen_number(step), "elapsed_s": prior + time.perf_counter() - t0}
            logger.log(row)
            improved = state["best_val"] is None or loss < state["best_val"] - cfg.min_delta
            if improved:
                state.update(best_val=loss, best_step=step, bad_evals=0)
                best = {k: v for k, v in self._param_tensors().items()}
                if self.ckpt_dir is not None:
                    from safetensors.torch import save_file

                    with atomic_path(self.ckpt_dir / "best.safetensors") as tmp:
                        save_file(best, str(tmp), metadata={"step": str(step)})
            else:
                state["bad_evals"] += 1
            stop = cfg.patience is not None and state["bad_evals"] >= cfg.patience
            return stop

        def checkpoint(epoch: int, pos: int) -> None:
            state.update(epoch=epoch, pos=pos, rows=logger.rows)
            self.save_checkpoint({**state, "elapsed_s": prior + time.perf_counter() - t0})
            logger.flush()

        step = state["step"]
        interrupted = False
        if self.progress:
            self.progress("training", step, self.total_steps)
        epoch = state["epoch"]
        while epoch < cfg.epochs and step < self.total_steps and not state["stopped_early"]:
            order = self.epoch_order(epoch)
            micro = list(order.split(cfg.batch_size))
            groups = [micro[i : i + cfg.grad_accum] for i in range(0, len(micro), cfg.grad_accum)]
            start = state["pos"] if epoch == state["epoch"] else 0
            for gi in range(start, len(groups)):
                p.set_unfrozen(self.unfrozen_at(step))
                prefix = self.prefix("train", self.prefix_start(step))
                factor = self.lr_factor(step)
                for g in self.optimizer.param_groups:
                    g["lr"] = g["base_lr"] * factor
                self.optimizer.zero_grad(set_to_none=True)
                group = groups[gi]
                n_targets = sum(int(self._targets_in(items)) for items in group)
                total_loss = 0.0
                for items in group:
                    loss, _ = p.loss_on(self.train_split, items, prefix)
                    (loss / max(n_targets, 1)).backward()
                    total_loss += float(loss.detach())
                if cfg.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_([q for q in self.params.values() if q.grad is not None],
                                                   cfg.grad_clip)
                self.optimizer.step()
                step += 1
                lrs = {g["name"]: g["lr"] for g in self.optimizer.param_groups}
                logger.log({"step": step, "epoch": epoch, "split": "train", "loss": total_loss / max(n_targets, 1),
                            "lr": lrs.get("head", float("nan")), "body_lr": lrs.get("body", float("nan")),
                            "unfrozen": self._unfrozen_number(step - 1),
                            "elapsed_s": prior + time.perf_counter() - t0})
                if self.progress:
                    self.progress("training", step, self.total_steps)
                end_of_epoch = gi == len(groups) - 1
                due = (cfg.eval_every is not None and step % cfg.eval_every == 0) or (
                    cfg.eval_every is None and end_of_epoch) or step >= self.total_steps
                next_pos = (epoch + 1, 0) if end_of_epoch else (epoch, gi + 1)
                if due:
                    state["step"] = step
                    if run_eval(step, epoch):
                        state["stopped_early"] = True
                    checkpoint(*next_pos)
                if state["stopped_early"] or step >= self.total_steps:
                    break
                if stop_after is not None and step >= stop_after:
                    state["step"] = step
                    checkpoint(*next_pos)
                    interrupted = True
                    break
            if interrupted or state["stopped_early"] or step >= self.total_steps:
                break
            epoch += 1
        state["step"] = step
        if not interrupted and (not logger.rows or logger.rows[-1].get("split") != "val"):
            run_eval(step, epoch)
            checkpoint(cfg.epochs, 0)
        elapsed = prior + time.perf_counter() - t0
        if not interrupted and best is not None:
            self._load_params({k: v for k, v in best.items()})
        logger.close()
        return TrainResult(
            steps=step, total_steps=self.total_steps, best_step=state["best_step"],
            best_val_loss=state["best_val"], stopped_early=bool(state["stopped_early"]), interrupted=interrupted,
            elapsed_s=round(elapsed, 3), unfrozen=self.unfrozen_at(max(0, step - 1)), history=list(logger.rows),
        )

    # ------------------------------------------------------------------------------------------ frozen prefix
    def prefix_start(self, step: int) -> int | None:
        """First trainable block at ``step`` when the frozen-prefix cache applies (see the predictor), else None."""
        if not self.use_prefix:
            return None
        u = self.unfrozen_at(step)
        if u == "all":
            return None
        start = self.p.top_block - int(u) + 1
        return start if start > 0 else None

    def prefix(self, split: str, start: int | None) -> Prefix | None:
        """The cached residual streams entering block ``start`` for ``split`` (computed once per start)."""
        if start is None:
            return None
        key = (split, start)
        if key not in self._prefix:
            if start not in self._checked:
                self._checked.add(start)
                if not self.p.check_prefix_path(self.train_split, start):
                    self.use_prefix = False
                    return None
            self._prefix = {k: v for k, v in self._prefix.items() if k[1] == start}  # drop stale starts
            data = self.train_split if split == "train" else self.val_split
            self._prefix[key] = (start, self.p.prefix_states(data, start, self.eval_batch_size))
        return self._prefix[key]

    def _targets_in(self, items: torch.Tensor) -> int:
        if self.p.kind == "token":
            return len(items)
        return int(self.train_split.selected[items].sum())

    def _unfrozen_number(self, step: int) -> int:
        u = self.unfrozen_at(max(0, step))
        return self.max_blocks if u == "all" else int(u)
