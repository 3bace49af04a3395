"""The training loop behind ``slimtrain train``: a run directory, metrics, checkpoints, resume.

A run directory holds ``config.json``, ``metrics.jsonl`` (one JSON object per logged step and per
validation), ``checkpoint.pt`` (written atomically: a temporary file renamed over the last good
one), ``loss.png`` and ``summary.json``. ``--resume`` continues from ``checkpoint.pt`` exactly:
model, optimizer (stochastic-rounding generator included) and data order are restored, so the
losses equal those of an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import resource
import signal
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from slimtrain.distributed import Collectives, RoundsOptimizer, launch
from slimtrain.optim import memory_report
from slimtrain.optim.base import check_number
from slimtrain.train.data import DEFAULT_CORPUS, load_corpus, load_tokenizer, random_windows, split_tokens
from slimtrain.train.models import GPT, GPT_SIZES
from slimtrain.train.plan import model_tensor_specs, parameter_count, static_memory
from slimtrain.train.recipes import (
    ADAMW_OPTIONS,
    DATA_PARALLEL,
    DEFAULT_RECIPE,
    LORDO_OPTIONS,
    RECIPES,
    Recipe,
    get_recipe,
)

CHECKPOINT = "checkpoint.pt"
CUSTOM_MODEL = "custom"
# settings that may differ when resuming (they do not change the trajectory before the checkpoint)
RESUMABLE_CHANGES = ("steps", "out", "eval_every", "checkpoint_every", "compile", "dist_timeout", "device")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, corrupt, or from another configuration."""


@dataclass
class TrainConfig:
    """Everything that defines a run. Learning rate: linear warm-up over ``warmup`` steps, then
    cosine decay to ``lr * min_lr_ratio`` at ``steps``. ``seq_len`` None = the model's context.
    ``clip``: maximum global gradient norm (0 = no clipping). ``sync_every``, ``low_rank``,
    ``omega``: override the recipe's (rounds, rank of low-rank moments, LoRDO's ω);
    ``lordo_options``: further :class:`slimtrain.LoRDO` keyword arguments for LoRDO recipes.
    ``optim_options``: for AdamW recipes, "beta1" or a further :class:`slimtrain.AdamW` keyword
    argument (ADAMW_OPTIONS); pairs (state_maps, state_rounding) may be given as "m,v" strings.
    ``dist_timeout``: seconds a collective may wait for the other ranks before the run fails.
    ``device``: "cpu", "cuda" (rank r of a torchrun job on a machine uses GPU LOCAL_RANK, and the
    ranks communicate through NCCL; on the CPU through gloo) or "auto": CUDA where torch sees a GPU."""

    recipe: str = DEFAULT_RECIPE
    model: str = "small"
    data: str = DEFAULT_CORPUS
    tokenizer: str | None = None
    steps: int = 300
    batch_size: int = 32
    seq_len: int | None = None
    lr: float = 3e-3
    warmup: int = 40
    min_lr_ratio: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.1
    clip: float = 1.0
    eval_every: int = 100
    eval_batches: int = 16
    checkpoint_every: int = 100
    seed: int = 0
    compile: bool = True
    out: str | None = None
    sync_every: int | None = None
    low_rank: int | None = None
    omega: float | None = None
    lordo_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    optim_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    dist_timeout: float = 120.0
    device: str = "auto"

    def validate(self) -> None:
        """Raise ValueError naming the first invalid setting and what it accepts."""
        get_recipe(self.recipe)
        if self.model not in GPT_SIZES and self.model != CUSTOM_MODEL:
            raise ValueError(f"unknown model {self.model!r}; accepted: {', '.join(GPT_SIZES)}")
        for name in ("steps", "batch_size", "eval_every", "eval_batches", "checkpoint_every", "sync_every",
                     "low_rank"):
            value = getattr(self, name)
            if value is None and name in ("sync_every", "low_rank"):
                continue
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.omega is not None and not 0 <= self.omega <= 1:
            raise ValueError(f"omega must be in [0, 1], got {self.omega!r}")
        if self.device not in launch.DEVICES:
            raise ValueError(f"unknown device {self.device!r}; accepted: {', '.join(launch.DEVICES)}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda': this torch build sees no CUDA device; accepted here: cpu")
        if not self.dist_timeout > 0:
            raise ValueError(f"dist_timeout must be > 0 seconds, got {self.dist_timeout!r}")
        if self.seq_len is not None and (not isinstance(self.seq_len, int) or self.seq_len < 1):
            raise ValueError(f"seq_len must be a positive integer, got {self.seq_len!r}")
        if not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f"warmup must be a non-negative integer, got {self.warmup!r}")
        for name, value in (("lr", self.lr), ("weight_decay", self.weight_decay), ("clip", self.clip)):
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        config = cls(**{k: v for k, v in values.items() if k in known})
        config.betas = tuple(config.betas)
        return config


def _adamw_overrides(recipe: Recipe, options: dict[str, Any]) -> dict[str, Any]:
    """Recipe fields that ``options`` (TrainConfig.optim_options) set on the AdamW ``recipe``."""
    accepted = ("beta1", *ADAMW_OPTIONS)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"unknown optim option(s) {', '.join(unknown)}; accepted: {', '.join(accepted)}")
    pairs = ("state_maps", "state_rounding")
    values = {key: tuple(value.split(",") if isinstance(value, str) else value) if key in pairs else value
              for key, value in options.items()}
    if "beta1" in values:
        check_number("optim option beta1", values["beta1"], 0.0, 1.0, high_open=True)
    beta1 = {"beta1": values.pop("beta1")} if "beta1" in values else {}
    return dict(beta1, adamw_options=tuple({**dict(recipe.adamw_options), **values}.items()))


# the TrainConfig fields that override a recipe's, and the recipe methods that have them
METHODS_OF_OVERRIDES = {"sync_every": ("diloco", "lordo"), "low_rank": ("lowrank-ddp", "lordo"),
                        "omega": ("lordo",), "lordo_options": ("lordo",), "optim_options": ("adamw", "ddp")}


def inapplicable_overrides(recipe: Recipe, overrides: dict[str, Any]) -> list[str]:
    """The names of ``overrides`` (TrainConfig fields, set) that ``recipe``'s method does not have."""
    return [name for name, methods in METHODS_OF_OVERRIDES.items()
            if overrides.get(name) not in (None, {}) and recipe.method not in methods]


def run_recipe(config: TrainConfig) -> Recipe:
    """The recipe of ``config`` with its overrides (sync_every, low_rank, omega, lordo and optim
    options) applied; ValueError for an override its method does not have."""
    recipe = get_recipe(config.recipe)
    inapplicable = inapplicable_overrides(recipe, config.to_dict())
    if inapplicable:
        name = inapplicable[0]
        raise ValueError(f"{name} applies to recipes of method {' or '.join(METHODS_OF_OVERRIDES[name])}, "
                         f"not to {recipe.name!r} (method {recipe.method!r})")
    overrides = dict(sync_every=config.sync_every, rank=config.low_rank, omega=config.omega)
    if config.lordo_options:
        unknown = sorted(set(config.lordo_options) - set(LORDO_OPTIONS))
        if unknown:
            raise ValueError(f"unknown lordo option(s) {', '.join(unknown)}; "
                             f"accepted: {', '.join(LORDO_OPTIONS)}")
        overrides["lordo_options"] = tuple({**dict(recipe.lordo_options), **config.lordo_options}.items())
    if config.optim_options:
        overrides.update(_adamw_overrides(recipe, config.optim_options))
    return dataclasses.replace(recipe, **{k: v for k, v in overrides.items() if v is not None})


def start_workers(config: TrainConfig) -> tuple[int, int]:
    """(rank, world size): join torchrun's group, or a group of one for a recipe that
    communicates; (0, 1) with no process group otherwise."""
    recipe = run_recipe(config)
    if not (recipe.distributed or launch.launched_by_torchrun()):
        return 0, 1
    rank, world = launch.start(config.dist_timeout, config.device)
    if world > 1 and not recipe.distributed:
        launch.stop()
        raise ValueError(f"recipe {recipe.name!r} trains a single worker; under torchrun use one of "
                         f"{', '.join(n for n, r in RECIPES.items() if r.distributed)}")
    return rank, world


def learning_rate(config: TrainConfig, step: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based): warm-up then cosine decay."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    floor = config.lr * config.min_lr_ratio
    return floor + (config.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@dataclass
class RunResult:
    """What a finished (or interrupted) run reports; ``summary`` is also in ``summary.json``."""

    run_dir: Path
    summary: dict[str, Any]
    interrupted: bool = False


def peak_process_memory() -> int:
    """Peak resident memory of this process so far, bytes (ru_maxrss is in KiB on Linux)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def write_atomically(path: Path, save: Any) -> None:
    """Call ``save(temporary_path)``, flush it to disk, then rename it to ``path`` (atomic on POSIX:
    readers see the old file or the new one, never a partial one)."""
    temporary = path.with_name(f".{path.name}.tmp")
    save(temporary)
    with open(temporary, "rb") as f:
        os.fsync(f.fileno())
    os.replace(temporary, path)


def load_checkpoint(run_dir: Path) -> dict[str, Any]:
    """The checkpoint of ``run_dir``; CheckpointError if it is missing or unreadable."""
    path = run_dir / CHECKPOINT
    if not path.is_file():
        raise CheckpointError(f"--resume {run_dir}: no {CHECKPOINT} in it")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for truncated or foreign files
        raise CheckpointError(f"--resume {run_dir}: {CHECKPOINT} is corrupt or unreadable "
                              f"({type(error).__name__}: {str(error).splitlines()[0][:120]})") from None
    if not isinstance(checkpoint, dict) or not {"step", "config", "model", "optimizer"} <= checkpoint.keys():
        raise CheckpointError(f"--resume {run_dir}: {CHECKPOINT} is not a slimtrain checkpoint")
    return checkpoint


def check_resumable(saved: TrainConfig, requested: TrainConfig) -> None:
    """CheckpointError naming the settings that differ and would change the trajectory."""
    changed = [
        f"{name} (checkpoint: {getattr(saved, name)!r}, now: {getattr(requested, name)!r})"
        for name in saved.to_dict()
        if name not in RESUMABLE_CHANGES and getattr(saved, name) != getattr(requested, name)
    ]
    if changed:
        raise CheckpointError("the checkpoint was made with other settings: " + "; ".join(changed))


class Trainer:
    """One run: builds the corpus, model, recipe and optimizer from ``config`` and trains.

    ``model``: train this nn.Module instead of a named GPT (it maps (batch, length) int64 token ids
    to (batch, length, vocab) logits; ``config.model`` is then "custom").
    """

    def __init__(self, config: TrainConfig, run_dir: Path, model: nn.Module | None = None,
                 progress: bool = True, log: Any = print, rank: int = 0, world: int = 1) -> None:
        config.validate()
        self.rank, self.world, self.is_main = rank, world, rank == 0
        self.config, self.run_dir, self.progress, self.log = config, run_dir, progress and rank == 0, log
        self.recipe = run_recipe(config)
        self.tokenizer = load_tokenizer(config.tokenizer)
        self.corpus = load_corpus(config.data, log)
        tokens = self.tokenizer.encode(self.corpus.text)
        self.train_tokens, self.val_tokens = split_tokens(tokens)
        torch.manual_seed(config.seed)
        if model is None:
            gpt = GPT_SIZES[config.model]
            model = GPT(dataclasses.replace(gpt, vocab_size=self.tokenizer.vocab_size))
            self.context = gpt.context
        else:
            self.context = config.seq_len or 0
        self.seq_len = config.seq_len or self.context
        if self.seq_len < 1:
            raise ValueError("seq_len is required when training a custom model")
        if self.seq_len > self.context and config.model != CUSTOM_MODEL:
            raise ValueError(f"seq_len {self.seq_len} exceeds the context of model {config.model!r} "
                             f"({self.context})")
        shortest = min(self.train_tokens.numel(), self.val_tokens.numel())
        if self.seq_len + 2 > shortest:
            raise ValueError(f"seq_len {self.seq_len} is too long for the corpus {self.corpus.name!r}: "
                             f"its validation split has {self.val_tokens.numel()} tokens")
        self.device = launch.local_device(config.device)
        self.float_specs = model_tensor_specs(model)
        self.model = self.forward_model = model.to(self.device)
        self.recipe.prepare_model(model)
        self.optimizer = self.recipe.make_optimizer(
            model, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay,
            seed=config.seed, compile=config.compile,
        )
        # traffic: DDP's gradient all-reduces or the rounds' pseudo-gradients, and control flags
        self.collectives = self.control = None
        if self.recipe.distributed:
            self.control = Collectives()
            if self.recipe.method in DATA_PARALLEL:
                self.collectives = Collectives()
                self.forward_model = nn.parallel.DistributedDataParallel(
                    model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
                self.forward_model.register_comm_hook(None, self.collectives.ddp_comm_hook)
            else:
                self.collectives = self.optimizer.collectives
        self.data_rng = torch.Generator().manual_seed(config.seed + 1_000_003 * rank)
        self.step = 0
        self.train_seconds = 0.0
        val_rng = torch.Generator().manual_seed(config.seed + 1)
        self.val_batches = [self.batch(self.val_tokens, val_rng) for _ in range(config.eval_batches)]

    # ------------------------------------------------------------------------ checkpoints
    def state(self) -> dict[str, Any]:
        traffic = {name: dict(c.sent) for name, c in (("sent", self.collectives), ("control", self.control))
                   if c is not None}
        return dict(step=self.step, config=self.config.to_dict(), model=self.model.state_dict(),
                    optimizer=self.optimizer.state_dict(), data_rng=self.data_rng.get_state(),
                    train_seconds=self.train_seconds, traffic=traffic)

    def save_checkpoint(self) -> None:
        """Write ``checkpoint.pt`` atomically. With several ranks, every other rank first writes
        its own state to ``checkpoint.rank<R>.step<N>.pt``; rank 0's ``checkpoint.pt`` (written
        after all of them) names the step, so a crash part-way leaves the last complete set."""
        state = self.state()
        if self.world == 1:
            write_atomically(self.run_dir / CHECKPOINT, lambda path: torch.save(state, path))
            return
        own = rank_checkpoint(self.run_dir, self.rank, self.step)
        if not self.is_main:
            write_atomically(own, lambda path: torch.save(state, path))
        launch.barrier()
        if self.is_main:
            state["world_size"] = self.world
            write_atomically(self.run_dir / CHECKPOINT, lambda path: torch.save(state, path))
        launch.barrier()
        for old in self.run_dir.glob(f"checkpoint.rank{self.rank}.step*.pt"):
            if old != own:
                old.unlink()

    def restore(self, checkpoint: dict[str, Any]) -> None:
        """Continue from ``checkpoint`` (see :func:`load_checkpoint`); other ranks load their own
        file of the same step."""
        check_resumable(TrainConfig.from_dict(checkpoint["config"]), self.config)
        saved_world = int(checkpoint.get("world_size", 1))
        if saved_world != self.world:
            raise CheckpointError(f"the checkpoint was written by {saved_world} ranks; "
                                  f"this run has {self.world}")
        if not self.is_main:
            path = rank_checkpoint(self.run_dir, self.rank, int(checkpoint["step"]))
            try:
                checkpoint = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as error:  # missing or truncated file
                raise CheckpointError(f"rank {self.rank}: cannot read {path.name} "
                                      f"({type(error).__name__})") from None
        try:
            self.model.load_state_dict(checkpoint["model"])
            self.optimizer.load_state_dict(checkpoint["optimizer"])
        except (RuntimeError, ValueError, KeyError) as error:
            raise CheckpointError(f"the checkpoint does not fit this model and recipe: "
                                  f"{str(error).splitlines()[0][:200]}") from None
        self.data_rng.set_state(checkpoint["data_rng"])
        for name, counts in checkpoint.get("traffic", {}).items():
            collectives = self.collectives if name == "sent" else self.control
            collectives.sent.clear()
            collectives.sent.update(counts)
        self.step = int(checkpoint["step"])
        self.train_seconds = float(checkpoint.get("train_seconds", 0.0))

    # ------------------------------------------------------------------------ training
    def batch(self, tokens: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Random windows of ``tokens`` (drawn on the CPU, so that a seed gives the same data on
        every device) as (batch, seq_len) int64 inputs and targets on the training device."""
        inputs, targets = random_windows(tokens, self.config.batch_size, self.seq_len, generator)
        return inputs.to(self.device), targets.to(self.device)

    def loss(self, inputs: torch.Tensor, targets: torch.Tensor,
             model: nn.Module | None = None) -> torch.Tensor:
        """Mean cross-entropy of ``model`` (default: the training model, DDP-wrapped if any)."""
        logits = (model or self.forward_model)(inputs)
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))

    @torch.no_grad()
    def validate(self) -> float:
        """Mean loss over the fixed validation batches (nats per token)."""
        self.model.eval()
        losses = [self.loss(x, y, self.model).item() for x, y in self.val_batches]
        self.model.train()
        return sum(losses) / len(losses)

    def train_step(self) -> float:
        """One optimizer step; returns the training loss. A non-finite loss or gradient raises
        FloatingPointError before the optimizer (or the data order) is touched."""
        rng_state = self.data_rng.get_state()
        inputs, targets = self.batch(self.train_tokens, self.data_rng)
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss(inputs, targets)
        loss.backward()
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = nn.utils.clip_grad_norm_(params, self.config.clip if self.config.clip > 0 else math.inf)
        if not (torch.isfinite(loss) and torch.isfinite(norm)):
            self.data_rng.set_state(rng_state)
            raise FloatingPointError(f"non-finite loss or gradient at step {self.step + 1}")
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(self.config, self.step)
        self.optimizer.step()
        self.step += 1
        last_round_open = isinstance(self.optimizer, RoundsOptimizer) and self.optimizer.local_steps % (
            self.optimizer.sync_every) != 0
        if self.step == self.config.steps and last_round_open:
            self.optimizer.synchronize()  # end on the averaged model
        return loss.item()

    def _log_metric(self, record: dict[str, Any]) -> None:
        if not self.is_main:
            return
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def _on_interrupt(self, signum: int, frame: Any) -> None:
        if self.interrupted:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.interrupted = True
        self.log("\ninterrupt: finishing this step, then saving a checkpoint (Ctrl-C again to abort)")

    def run(self, stop_after: int | None = None) -> RunResult:
        """Train from ``self.step`` to ``config.steps`` (or to ``stop_after``, leaving a checkpoint
        that ``--resume`` continues). Ctrl-C (SIGINT) lets the current step finish, saves a
        checkpoint and returns with ``interrupted=True``."""
        config = self.config
        tokens_per_step = config.batch_size * self.seq_len
        bar = tqdm(total=config.steps, initial=self.step, desc=config.recipe, unit="step",
                   disable=not self.progress, file=sys.stderr, dynamic_ncols=True)
        self.interrupted = False
        in_main_thread = threading.current_thread() is threading.main_thread()
        previous_handler = signal.signal(signal.SIGINT, self._on_interrupt) if in_main_thread else None
        try:
            last = config.steps if stop_after is None else min(config.steps, stop_after)
            while self.step < last and not self.interrupted:
                start = time.perf_counter()
                loss = self.train_step()
                seconds = time.perf_counter() - start
                self.train_seconds += seconds
                record = dict(step=self.step, loss=loss, lr=learning_rate(config, self.step - 1),
                              seconds=seconds)
                if self.collectives is not None:
                    record["sent_bytes"] = self.collectives.total_sent
                if self.control is not None:  # every rank stops at the same step
                    self.interrupted = self.control.any_(self.interrupted)
                if self.is_main and (self.step % config.eval_every == 0 or self.step == config.steps):
                    record["val_loss"] = self.validate()
                self._log_metric(record)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_step / seconds:,.0f}",
                                **({"val": f"{record['val_loss']:.3f}"} if "val_loss" in record else {}))
                if self.step % config.checkpoint_every == 0 or self.step == last or self.interrupted:
                    self.save_checkpoint()
        except FloatingPointError as error:
            if self.world == 1:  # other ranks would wait for this one in a collective
                self.save_checkpoint()  # the failed step changed nothing: this is the state before it
                raise FloatingPointError(f"{error}; the state before it is saved in "
                                         f"{self.run_dir / CHECKPOINT}") from None
            raise
        except (RuntimeError, torch.distributed.DistError) as error:
            if self.world == 1:
                raise
            detail = str(error).splitlines()[0][:200]
            raise OSError(f"rank {self.rank}: lost contact with the other ranks (one stopped or hangs; "
                          f"the last checkpoint in {self.run_dir} resumes): {detail}") from None
        finally:
            bar.close()
            if in_main_thread:
                signal.signal(signal.SIGINT, previous_handler)
        if self.interrupted and self.is_main:
            self.log(f"interrupted: checkpoint saved at step {self.step}; continue with "
                     f"`slimtrain train --resume {self.run_dir}`")
        if not self.is_main:
            return RunResult(self.run_dir, {}, self.interrupted)
        summary = self.summary()
        with open(self.run_dir / "summary.json", "w") as f:
            json.dump(summary, f, indent=1)
        plot_losses(self.run_dir)
        return RunResult(self.run_dir, summary, self.interrupted)

    def summary(self) -> dict[str, Any]:
        """Final numbers of the run: losses, speed, measured static memory per category, peak
        process memory, and the formula's static memory of the same model under other recipes."""
        records = read_metrics(self.run_dir)
        val = [r for r in records if "val_loss" in r]
        report = memory_report(self.model, self.optimizer)
        parameters = parameter_count(self.float_specs)
        same_model = {name: sum(static_memory(self.float_specs, RECIPES[name]).values())
                      for name in ("adamw", "bf16-master")}
        tokens = self.step * self.config.batch_size * self.seq_len * self.world
        traffic = {} if self.collectives is None else dict(
            world_size=self.world, sent_bytes=dict(self.collectives.sent),
            sent_bytes_per_step=self.collectives.total_sent / max(self.step, 1),
            control_bytes=self.control.total_sent,
        )
        return dict(
            recipe=self.config.recipe, model=self.config.model, corpus=self.corpus.name,
            tokenizer=getattr(self.tokenizer, "name", "custom"), parameters=parameters,
            steps=self.step, tokens=tokens, val_loss=val[-1]["val_loss"] if val else None,
            val_step=val[-1]["step"] if val else None,
            train_loss=records[-1]["loss"] if records else None,
            tokens_per_second=tokens / max(self.train_seconds, 1e-9),
            steady_tokens_per_second=self.world * self.config.batch_size * self.seq_len / statistics.median(
                r["seconds"] for r in records[len(records) // 10:]) if records else None,
            static_memory=dict(report.categories), static_bytes=report.total,
            static_bytes_per_param=report.total / parameters,
            same_model_static_bytes=same_model, peak_process_memory=peak_process_memory(),
            device=str(self.device), peak_device_memory=(torch.cuda.max_memory_allocated(self.device)
                                                         if self.device.type == "cuda" else None),
            **traffic,
        )


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl`` (empty if there is none)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Drop records after ``step`` (written after the checkpoint a resumed run starts from)."""
    kept = [r for r in read_metrics(run_dir) if r["step"] <= step]
    write_atomically(run_dir / "metrics.jsonl",
                     lambda path: path.write_text("".join(json.dumps(r) + "\n" for r in kept)))


def plot_losses(run_dir: Path) -> None:
    """``loss.png``: training loss (thin) and validation loss (markers) against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["step"] for r in records], [r["loss"] for r in records], lw=0.8, alpha=0.6, label="train")
    val = [r for r in records if "val_loss" in r]
    ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(run_dir.name)
    ax.legend()
    fig.tight_layout()
    fig.savefig(run_dir / "loss.png", dpi=120)
    plt.close(fig)


def default_run_dir(config: TrainConfig) -> Path:
    return Path("runs") / f"{config.recipe}-{config.model}-{time.strftime('%Y%m%d-%H%M%S')}"


def prepare_run_dir(run_dir: Path, force: bool, resumable: bool = True) -> None:
    """Create ``run_dir``; an existing non-empty directory is refused unless ``force`` (the error
    suggests --resume where ``resumable``)."""
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        if not force:
            resume_hint = f" or --resume {run_dir} to continue it" if resumable else ""
            raise ValueError(f"directory {run_dir} already exists; pass --force to overwrite it{resume_hint}")
        for name in (CHECKPOINT, "metrics.jsonl", "summary.json", "loss.png", "config.json"):
            (run_dir / name).unlink(missing_ok=True)
        for path in run_dir.glob("checkpoint.rank*.pt"):
            path.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)


def rank_checkpoint(run_dir: Path, rank: int, step: int) -> Path:
    """The file of rank ``rank``'s own state at ``step`` (ranks other than 0)."""
    return run_dir / f"checkpoint.rank{rank}.step{step}.pt"


def train(config: TrainConfig, model: nn.Module | None = None, force: bool = False,
          progress: bool = True, log: Any = print, stop_after: int | None = None) -> RunResult:
    """Start a new run in ``config.out`` (default ``runs/<recipe>-<model>-<time>``). Under
    torchrun every rank calls this; rank 0 chooses and prepares the run directory."""
    config.validate()
    if model is not None:
        config.model = CUSTOM_MODEL
    rank, world = start_workers(config)
    try:
        launch.check_same_everywhere(config.to_dict())

        def choose_run_dir() -> str:
            run_dir = Path(config.out) if config.out else default_run_dir(config)
            prepare_run_dir(run_dir, force)
            return str(run_dir)

        run_dir = Path(launch.decided_by_rank0(choose_run_dir))
        trainer_config = dataclasses.replace(config, out=str(run_dir))
        trainer = Trainer(trainer_config, run_dir, model, progress, log, rank, world)
        if rank == 0:
            (run_dir / "config.json").write_text(json.dumps(trainer_config.to_dict(), indent=1))
        return trainer.run(stop_after)
    finally:
        launch.stop()


def resume(run_dir: Path, overrides: dict[str, Any] | None = None, model: nn.Module | None = None,
           progress: bool = True, log: Any = print, stop_after: int | None = None) -> RunResult:
    """Continue the run in ``run_dir`` from its checkpoint; ``overrides`` may change only the
    settings in :data:`RESUMABLE_CHANGES` (e.g. more ``steps``)."""
    run_dir = Path(run_dir)
    checkpoint = load_checkpoint(run_dir)
    config = TrainConfig.from_dict(checkpoint["config"])
    requested = dataclasses.replace(config, **(overrides or {}), out=str(run_dir))
    check_resumable(config, requested)
    done = int(checkpoint["step"])
    if requested.steps < done:
        raise CheckpointError(f"--resume {run_dir}: --steps {requested.steps} is fewer than the {done} steps "
                              "this run has done")
    if model is None and config.model == CUSTOM_MODEL:
        raise CheckpointError(f"--resume {run_dir}: this run trained a model given in Python "
                              f"({config.model!r}); resume it there: slimtrain.train.trainer.resume(run_dir, "
                              "model=...)")
    rank, world = start_workers(requested)
    try:
        if rank == 0 and requested.steps != config.steps and done > 0:
            log(f"note: --steps {config.steps} -> {requested.steps}: the learning-rate schedule now spans "
                f"{requested.steps} steps, so it goes from {learning_rate(config, done - 1):.3g} at step "
                f"{done} to {learning_rate(requested, done):.3g} at step {done + 1}")
        launch.check_same_everywhere(requested.to_dict())
        trainer = Trainer(requested, run_dir, model, progress, log, rank, world)
        trainer.restore(checkpoint)
        if rank == 0:
            truncate_metrics(run_dir, trainer.step)
            (run_dir / "config.json").write_text(json.dumps(requested.to_dict(), indent=1))
        launch.barrier()
        return trainer.run(stop_after)
    finally:
        launch.stop()


def _mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:,.1f} MiB"


def _at_step(summary: dict[str, Any]) -> str:
    """" (at step N)" where the last validation came before the last step (an interrupted run)."""
    step = summary.get("val_step")
    return f" (at step {step})" if step not in (None, summary["steps"]) else ""


def format_summary(summary: dict[str, Any], run_dir: Path) -> str:
    """The end-of-run report printed by ``slimtrain train``."""
    params = summary["parameters"]
    memory = summary["static_memory"]
    lines = [
        f"run {run_dir}: recipe {summary['recipe']}, model {summary['model']} ({params:,} parameters), "
        f"corpus {summary['corpus']}, {summary['steps']} steps, {summary['tokens']:,} tokens",
        f"validation loss  {summary['val_loss']:.4f} nats/token" + _at_step(summary)
        if summary["val_loss"] is not None
        else "validation loss  (no validation yet)",
        f"speed            {summary['steady_tokens_per_second']:,.0f} tokens/s steady (median step after the "
        f"first 10%); {summary['tokens_per_second']:,.0f} tokens/s overall, compilation included",
        "static memory    " + ", ".join(f"{k.replace('_', ' ')} {_mib(v)}" for k, v in memory.items())
        + f"; total {_mib(summary['static_bytes'])} = {summary['static_bytes_per_param']:.3f} B/param"
        + " (measured)",
    ]
    for name, label in (("adamw", "FP32 AdamW"), ("bf16-master", "mixed precision (BF16 + FP32 master)")):
        other = summary["same_model_static_bytes"][name]
        lines.append(f"  same model, {label}: {_mib(other)} = {other / params:.3f} B/param "
                     f"({other / summary['static_bytes']:.1f}x this run)")
    if "sent_bytes" in summary:
        parts = ", ".join(f"{purpose} {_mib(size)}" for purpose, size in summary["sent_bytes"].items())
        lines.append(f"traffic          {summary['world_size']} ranks; each sent {parts} "
                     f"= {summary['sent_bytes_per_step'] / 1024:,.1f} KiB per step "
                     f"(+ {summary['control_bytes']:,} B of stop flags)")
    device_peak = summary.get("peak_device_memory")
    lines += [
        f"peak process memory {_mib(summary['peak_process_memory'])}"
        + (f"; peak {summary['device']} memory {_mib(device_peak)} (allocated)" if device_peak else ""),
        f"files            {run_dir}/{{config.json, metrics.jsonl, loss.png, {CHECKPOINT}, summary.json}}",
    ]
    return "\n".join(lines)
