"""The LoRA finetuning recipe: one readable function, :func:`train`.

Layout of a run (``results/NAME/``): ``config.json`` (the resolved :class:`TrainConfig`),
``checkpoints/step_000000100.ckpt`` … (LoRA tensors + optimizer/loop state, written
atomically, latest ``save_top_k`` kept), ``lora.json`` (adapter metadata), ``history.json``
(val loss per validation), ``summary.json`` (history + recommended checkpoint) and
``tensorboard/``.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypedDict

import lightning.pytorch as _pl
import torch

from fish_speech_core.files import NotWritableError, OverlapError, atomic_write, refuse_overlap, require_writable, sha256_file
from fish_speech_core.finetune.checkpoints import (
    AtomicCheckpointIO,
    Recommendation,
    checkpoint_name,
    list_checkpoints,
    newest_valid_checkpoint,
    read_checkpoint,
    recommend,
    remove_partial_checkpoints,
)
from fish_speech_core import defaults
from fish_speech_core.allocator import release_freed_memory
from fish_speech_core.finetune.data import coverage
from fish_speech_core.finetune.distributed import (
    Rendezvous,
    World,
    agree_on_resume,
    broadcast,
    cpu_threads,
    destroy_process_group,
    init_process_group,
    is_peer_failure,
    lightning_environment,
    peer_failure,
    resolve_world,
    start_local_ranks,
    stop_local_ranks,
    wait_local_ranks,
)
from fish_speech_core.finetune.limits import TrainError, base_max_seq_len, resolve_max_length
from fish_speech_core.finetune.lora import (
    LoraError,
    LoraMetadata,
    add_lora,
    load_lora_state_dict,
    read_adapter,
    save_metadata,
)
from fish_speech_core.finetune.module import FinetuneData, LoraFinetune, TrainConfig
from fish_speech_core.finetune.shards import check_data_fits_base
from fish_speech_core.lm.checkpoint import Pretrained
from fish_speech_core.progress import progress_bar
from fish_speech_core.threads import small_on_cpu
from fish_speech_core.weights import WeightsError



class TrainProgress(TypedDict):
    """What :func:`train` reports to its ``progress`` hook, after an optimizer step."""

    step: int  # optimizer steps done (a resumed run starts at its checkpoint's step)
    max_steps: int
    loss: float  # training loss of the latest step (nan before the first)
    tokens_per_s: float  # training tokens per second in the latest step
    lr: float  # learning rate of the latest step
    eta_s: float | None  # seconds to max_steps at this run's mean step rate; None before a step is timed


ProgressHook = Callable[[TrainProgress], None]


@dataclass
class TrainResult:
    """What a finished run reports (small values only)."""

    run_dir: Path
    final_step: int
    history: list[dict] = field(default_factory=list)
    recommendation: Recommendation | None = None
    checkpoints: list[Path] = field(default_factory=list)
    num_truncated: int = 0
    resumed_from: Path | None = None
    notes: list[str] = field(default_factory=list)
    # per speaker: {"seen": training sentences trained on, "sentences": in the training split}
    coverage: dict[str, dict[str, int]] = field(default_factory=dict)
    world_size: int = 1  # processes that trained (devices x num_nodes)
    rank: int = 0  # this process's rank (0 writes the run's files and reports progress)


def resolve_precision(precision: str) -> str:
    """``auto``: bf16-true on a CUDA device with bf16 support, else 32-true."""
    if precision != "auto":
        return precision
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-true"
    return "32-true"


def find_resume(config: TrainConfig, resume: str) -> tuple[Path | None, list[str]]:
    """The checkpoint to resume from for ``--resume auto|never|PATH``, checked against ``config``."""
    notes: list[str] = []
    existing = list_checkpoints(config.checkpoint_dir)
    if resume == "never":
        if existing:
            raise TrainError(
                f"{config.checkpoint_dir} already holds checkpoints; pass --resume auto to continue "
                f"that run, or choose a new --project"
            )
        return None, notes
    if resume == "auto":
        path, skipped = newest_valid_checkpoint(config.checkpoint_dir)
        notes += [f"skipped unreadable checkpoint {s}" for s in skipped]
    else:
        path = Path(resume)
        if not path.is_file():
            raise TrainError(f"--resume {resume}: no such checkpoint file")
    if path is None:
        return None, notes
    try:
        saved = TrainConfig.from_dict(read_checkpoint(path)["fishtune_config"])
    except Exception as err:  # noqa: BLE001
        raise TrainError(f"--resume: cannot use {path}: {err}") from None
    problems = config.mismatches(saved)
    if problems:
        raise TrainError(
            f"the run in {config.run_dir} was started with different settings, so it cannot be "
            f"resumed: {'; '.join(problems)}. Use the original settings, or a new --project "
            f"(--init-lora {path} starts a new run from its adapters)."
        )
    return path, notes


def build_model(config: TrainConfig) -> Pretrained:
    """Load the base folder in fp32 with fresh adapters (and --init-lora weights if given)."""
    from fish_speech_core.lm import ConfigError, load_pretrained
    from fish_speech_core.tokenizer import TokenizerError

    try:
        loaded = load_pretrained(config.base, dtype=torch.float32)
    except (WeightsError, ConfigError, TokenizerError, OSError) as err:
        raise TrainError(
            f"--base {config.base} is not a Fish Speech 1.4 checkpoint folder: {err}"
        ) from None
    model = add_lora(loaded.model, config.lora)
    if config.init_lora:
        adapter = read_adapter(config.init_lora)
        if adapter.metadata is not None:
            adapter.metadata.check(config.lora)
        try:
            load_lora_state_dict(model, adapter.tensors)
        except LoraError as err:
            raise TrainError(f"--init-lora {config.init_lora}: {err}") from None
    return replace(loaded, model=model)


def train(config: TrainConfig, resume: str = "auto", progress: ProgressHook | None = None,
          progress_every: int = 10, show_progress: bool = True, rendezvous: Rendezvous | None = None) -> TrainResult:
    """Finetune ``config.base`` with LoRA on ``config.data``; see the module docstring for files.

    Every process of a distributed run calls this (the node's first one starts the others, see
    :mod:`fish_speech_core.finetune.distributed`); rank 0 reports progress and writes the run's
    files, every rank returns the same :class:`TrainResult` numbers.

    Args:
        resume: ``"auto"`` (newest valid checkpoint of this project, if any), ``"never"`` or a path.
        progress: called on rank 0 every ``progress_every`` optimizer steps and after the last
            one with a :class:`TrainProgress` dict (``step``, ``max_steps``, ``loss``,
            ``tokens_per_s``, ``lr``, ``eta_s``).
        show_progress: draw the terminal bar (see :mod:`fish_speech_core.progress`).
        rendezvous: where this process is in a multi-process run; None reads ``NODE_RANK``,
            ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT`` and ``WORLD_SIZE`` from the environment.

    Raises:
        TrainError: bad settings or inputs, naming the flag; another rank of the run failed.
    """
    problems = config.validate()
    if problems:
        raise TrainError("; ".join(problems))
    try:  # the run folder is written: it must not be, be inside, or hold the base or the data
        inputs = [("--base", config.base), *(("--data", d) for d in config.data)]
        if config.init_lora:
            inputs.append(("--init-lora", config.init_lora))
        refuse_overlap(inputs, config.run_dir, "run folder")
        require_writable(config.run_dir, create=False)
    except (OverlapError, NotWritableError) as err:
        raise TrainError(str(err)) from None
    base_model = Path(config.base) / "model.pth"
    if not base_model.is_file():
        raise TrainError(f"--base {config.base} is not a Fish Speech 1.4 checkpoint folder: no model.pth")
    # Before anything heavy: a sample longer than the base's max_seq_len fails in the first step.
    max_length = resolve_max_length(config.max_length, base_max_seq_len(config.base), config.base)
    config = replace(config, base_sha256=sha256_file(base_model), max_length=max_length)
    world = resolve_world(config.devices, config.num_nodes, config.strategy, config.process_group_backend,
                          rendezvous or Rendezvous.from_env(os.environ),
                          torch.cuda.device_count() if torch.cuda.is_available() else 0)
    if config.batch_size % world.world_size:
        raise TrainError(f"--batch-size {config.batch_size} (the global batch) does not split evenly over the "
                         f"{world.world_size} processes of --devices {config.devices} x --num-nodes {config.num_nodes}")
    resume_path, notes = find_resume(config, resume)
    lead = world.global_rank == 0
    if lead:
        for partial in remove_partial_checkpoints(config.checkpoint_dir):
            notes.append(f"removed {partial.name}, a checkpoint write that was interrupted")
    check_data_fits_base(config.base, config.data)

    threads = torch.get_num_threads()
    if world.accelerator == "cpu" and world.per_node > 1 and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(cpu_threads(world))  # the node's cores are shared by its ranks
    children = start_local_ranks(world, config.to_dict(), str(resume_path or "never")) if world.starts_node else []
    try:
        if world.ddp:
            init_process_group(world)
            resume_path = agree_on_resume(world, resume_path, config.checkpoint_dir)
        try:
            result = _fit(config, world, resume_path, notes, progress, progress_every, show_progress)
        except Exception as err:
            if world.world_size > 1 and is_peer_failure(err):
                raise peer_failure(world, err, [s for s, _ in list_checkpoints(config.checkpoint_dir)]) from None
            raise
        finally:
            destroy_process_group()
        wait_local_ranks(children)
    except BaseException:
        stop_local_ranks(children)
        raise
    finally:
        torch.set_num_threads(threads)
    return result


def _fit(config: TrainConfig, world: World, resume_path: Path | None, notes: list[str],
         progress: ProgressHook | None, progress_every: int, show_progress: bool) -> TrainResult:
    """Build the model, data and trainer; validate, fit, and keep the final state."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import TensorBoardLogger

    lead = world.global_rank == 0
    release_freed_memory()  # before the model loads; LoraFinetune.setup repeats it in DDP children
    # Seed before the adapters are created: their init draws from the global generator, so
    # --seed (not whatever ran earlier in the process) decides it (the same on every rank).
    pl.seed_everything(config.seed, workers=True, verbose=False)
    loaded = build_model(config)
    model = loaded.model
    if world.accelerator == "cpu" and small_on_cpu(model, torch.device("cpu")):
        # Small kernels: one intra-op thread per process (train() restores the count). A 2x256
        # step of the tiny LM (all weights trainable) on 2 busy cores: 0.52 s wall / 0.23 s CPU on
        # one thread against 2.6-3.3 s wall / 1.2-1.4 s CPU on two (fish_speech_core/threads.py).
        torch.set_num_threads(1)
    try:
        data = FinetuneData(config, loaded.tokenizer, model.config.num_codebooks)
    except (ValueError, OSError) as err:  # empty or missing shards, damaged records
        raise TrainError(f"--data: {err}") from None
    notes += data.notes
    meta = LoraMetadata(r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout,
                        base_sha256=config.base_sha256)
    module = LoraFinetune(model, config, meta)

    run_dir = config.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    if lead:
        with atomic_write(run_dir / "config.json", "w") as handle:
            handle.write(json.dumps(config.to_dict(), indent=4, sort_keys=True) + "\n")
        save_metadata(meta, run_dir)

    history = _load_history(run_dir, resume_path) if lead else []
    recorder = HistoryRecorder(run_dir, history)
    strategy: Any = "auto"
    if world.ddp:
        from datetime import timedelta

        from lightning.pytorch.strategies import DDPStrategy

        strategy = DDPStrategy(cluster_environment=lightning_environment(world), process_group_backend=world.backend,
                               timeout=timedelta(seconds=defaults.DIST_TIMEOUT_S))
    # Saved when each validation ends (Lightning runs checkpoint callbacks after the others), so
    # a checkpoint always comes after its history row: a run killed right after publishing
    # step N never resumes from N with N's validation missing from history.json.
    # Lightning writes checkpoints on rank 0 only.
    checkpointing = ModelCheckpoint(
        dirpath=config.checkpoint_dir, filename="step_{step:09d}", auto_insert_metric_name=False,
        every_n_train_steps=None, every_n_epochs=1, save_on_train_epoch_end=False,
        save_top_k=config.save_top_k, monitor="step", mode="max", save_last=False,
        save_weights_only=False,
    )
    trainer = pl.Trainer(
        accelerator=world.accelerator, devices=world.devices, num_nodes=world.num_nodes, strategy=strategy,
        precision=resolve_precision(config.precision), max_steps=config.max_steps,
        accumulate_grad_batches=config.accumulate_grad_batches,
        gradient_clip_val=config.gradient_clip, gradient_clip_algorithm="norm",
        # in micro-batches of each rank: every rank runs accumulate_grad_batches per optimizer
        # step, so this is every val_check_interval optimizer steps whatever the world size
        val_check_interval=config.val_check_interval * config.accumulate_grad_batches,
        check_val_every_n_epoch=None, num_sanity_val_steps=0,
        limit_val_batches=config.max_val_batches or None, log_every_n_steps=1,
        logger=TensorBoardLogger(str(run_dir), name="tensorboard", version=""),
        callbacks=[checkpointing, recorder, StepProgress(config.max_steps, progress, progress_every, show_progress)],
        plugins=[AtomicCheckpointIO()], enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=str(run_dir), deterministic=False, use_distributed_sampler=False,
    )
    if resume_path is None:
        trainer.validate(module, datamodule=data, verbose=False)  # the loss before training
    trainer.fit(module, datamodule=data, ckpt_path=str(resume_path) if resume_path else None)

    step = trainer.global_step
    # rank 0's folder and history decide (another node may hold neither): every rank then makes
    # the same collective calls
    saved = {s for s, _ in list_checkpoints(config.checkpoint_dir)}
    validated = bool(recorder.history) and recorder.history[-1]["step"] == step
    save_final, validate_final = broadcast((step not in saved, not validated))
    if save_final:  # max_steps not a multiple of the interval: keep the final state too
        if validate_final:
            trainer.validate(module, datamodule=data, verbose=False)
        # a full checkpoint (optimizer, schedule, loops) so it can be resumed; loading is weights_only=True
        trainer.save_checkpoint(config.checkpoint_dir / checkpoint_name(step), weights_only=False)
    seen, truncated = module.run_totals()
    result = TrainResult(
        run_dir=run_dir, final_step=step, history=recorder.history,
        recommendation=recommend(recorder.history, config.checkpoint_dir),
        checkpoints=[p for _, p in list_checkpoints(config.checkpoint_dir)],
        num_truncated=truncated, resumed_from=resume_path, notes=notes,
        coverage=coverage(data.train_groups, seen), world_size=world.world_size, rank=world.global_rank,
    )
    if lead:
        _write_summary(result)
    return result


def _load_history(run_dir: Path, resume_path: Path | None) -> list[dict]:
    path = run_dir / "history.json"
    if resume_path is None or not path.is_file():
        return []
    step = int(read_checkpoint(resume_path)["global_step"])
    return [row for row in json.loads(path.read_text()) if row["step"] <= step]


def _write_summary(result: TrainResult) -> None:
    rec = result.recommendation
    summary = {
        "final_step": result.final_step,
        "history": result.history,
        "recommended": None if rec is None else rec.__dict__,
        "checkpoints": [str(p) for p in result.checkpoints],
        "num_truncated": result.num_truncated,
        "world_size": result.world_size,
        "coverage": result.coverage,
        "notes": result.notes,
    }
    with atomic_write(result.run_dir / "summary.json", "w") as handle:
        handle.write(json.dumps(summary, indent=4) + "\n")


# --- callbacks -------------------------------------------------------------------------------

class HistoryRecorder(_pl.Callback):
    """Keeps (step, train loss, val loss, top-5 acc) per validation in ``history.json``."""

    def __init__(self, run_dir: Path, history: list[dict]) -> None:
        self.run_dir = run_dir
        self.history = history

    def on_validation_end(self, trainer, pl_module) -> None:
        metrics = trainer.callback_metrics
        if "val/loss" not in metrics:
            return
        row = {
            "step": int(trainer.global_step),
            "train_loss": pl_module.last_train.get("loss"),
            "val_loss": float(metrics["val/loss"]),
            "top_5_accuracy": float(metrics["val/top_5_accuracy"]),
            "val_batches": int(sum(trainer.num_val_batches)),  # after the max_val_batches cap
        }
        self.history = [r for r in self.history if r["step"] != row["step"]] + [row]
        if trainer.is_global_zero:
            with atomic_write(self.run_dir / "history.json", "w") as handle:
                handle.write(json.dumps(self.history, indent=4) + "\n")


class StepProgress(_pl.Callback):
    """One place for training progress: the terminal bar (:func:`~fish_speech_core.progress.progress_bar`,
    over optimizer steps, with the latest loss and tokens/s) and the optional :data:`ProgressHook`.

    Our own callback rather than Lightning's bars: those count batches per epoch (unknown for
    the endless sample stream) and could not feed the hook.
    """

    def __init__(self, max_steps: int, hook: ProgressHook | None, every: int, show: bool) -> None:
        self.max_steps = max_steps
        self.hook = hook
        self.every = max(1, every)
        self.show = show
        self.bar = None
        self.task = None
        self.last_step = -1
        self.start: tuple[float, int] | None = None  # (time, step) when training (re)started

    def on_train_start(self, trainer, pl_module) -> None:
        if self.show and trainer.is_global_zero:
            self.bar = progress_bar()
            self.task = self.bar.add_task("train", total=self.max_steps, completed=trainer.global_step, unit="steps")
            self.bar.start()
        self.last_step = trainer.global_step
        self.start = (time.perf_counter(), trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == self.last_step:
            return
        self.last_step = step
        info = self._info(trainer, pl_module)
        if self.bar is not None:
            self.bar.update(self.task, completed=step,
                            note=f"loss {info['loss']:.3f}, {info['tokens_per_s']:.0f} tokens/s")
        if self.hook is not None and trainer.is_global_zero and (step % self.every == 0 or step == self.max_steps):
            self.hook(info)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None

    def on_exception(self, trainer, pl_module, exception) -> None:
        self.on_train_end(trainer, pl_module)  # leave the terminal clean for the error line

    def _info(self, trainer, pl_module) -> TrainProgress:
        step = trainer.global_step
        rate = None
        if self.start is not None and step > self.start[1]:
            rate = (step - self.start[1]) / max(time.perf_counter() - self.start[0], 1e-9)
        lr = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else math.nan
        return {
            "step": step, "max_steps": self.max_steps,
            "loss": pl_module.last_train.get("loss", math.nan),
            "tokens_per_s": pl_module.last_train.get("tokens_per_s", 0.0), "lr": lr,
            "eta_s": (self.max_steps - step) / rate if rate else None,
        }


__all__ = ["TrainError", "TrainProgress", "TrainResult", "train", "resolve_precision", "find_resume", "base_max_seq_len",
           "resolve_max_length"]
