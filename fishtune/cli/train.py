"""LoRA finetuning commands: train (Lightning + peft) and merge (adapter -> plain checkpoint)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer

from fish_speech_core import defaults as d
from fish_speech_core.choices import Backend, Sampling, TrainStrategy


class Format(str, Enum):
    pth = "pth"
    safetensors = "safetensors"


def _lora_settings(preset: str, r: int | None, alpha: float | None, dropout: float | None):
    from fish_speech_core.finetune.lora import LoraError, LoraSettings

    try:
        base = LoraSettings.from_name(preset)
        return LoraSettings(
            r=base.r if r is None else r,
            alpha=base.alpha if alpha is None else alpha,
            dropout=base.dropout if dropout is None else dropout,
        )
    except LoraError as err:
        raise typer.BadParameter(str(err), param_hint="--lora / --lora-r / --lora-alpha / --lora-dropout") from None


def train_command(
    project: str = typer.Option(..., "--project", help="Run name: outputs go to RESULTS_DIR/PROJECT/."),
    base: Path = typer.Option(..., "--base", help="Base checkpoint folder (fish-speech-1.4, init-base or a merged folder)."),
    data: list[Path] = typer.Option(..., "--data", help="Packed .protos shard or folder (repeatable)."),
    lora: str = typer.Option(d.LORA_PRESET, "--lora", help="LoRA preset: r_8_alpha_16 (r 8, alpha 16, dropout 0.01)."),
    lora_r: int | None = typer.Option(None, "--lora-r", help="Override the preset's rank."),
    lora_alpha: float | None = typer.Option(None, "--lora-alpha", help="Override the preset's alpha (scaling = alpha / r)."),
    lora_dropout: float | None = typer.Option(None, "--lora-dropout", help="Override the preset's dropout."),
    max_steps: int = typer.Option(d.MAX_STEPS, "--max-steps", help="Optimizer steps to train in total."),
    batch_size: int = typer.Option(
        d.BATCH_SIZE, "--batch-size",
        help="Samples per micro-batch over all processes (the global batch; each of the devices x nodes processes "
             "takes an equal share, so the world size changes speed, not results).",
    ),
    accumulate_grad_batches: int = typer.Option(1, "--accumulate-grad-batches", help="Batches per optimizer step."),
    max_length: int | None = typer.Option(
        None, "--max-length",
        help="Tokens per sample; longer samples are cut (and counted). Default: min(4096, the base's max_seq_len).",
    ),
    sampling: Sampling = typer.Option(
        Sampling.cover, "--sampling",
        help="cover: each sample's consecutive sentences start anywhere in the speaker (wrapping), so every clip "
             "is trained on; reference: Fish Speech 1.4's rule (speakers shorter than max-length/20 sentences "
             "always start at their first clip).",
    ),
    lr: float = typer.Option(d.LR, "--lr", help="AdamW learning rate (constant after 10 warmup steps)."),
    val_check_interval: int = typer.Option(d.VAL_CHECK_INTERVAL, "--val-check-interval", help="Validate and checkpoint every N steps."),
    max_val_batches: int = typer.Option(
        10, "--max-val-batches",
        help="Validate on at most this many held-out batches (the same ones each time); 0 = all of them.",
    ),
    val_fraction: float = typer.Option(d.VAL_FRACTION, "--val-fraction", help="Share of sentences held out for validation (by content hash)."),
    devices: str = typer.Option(
        "auto", "--devices",
        help="Processes per node: GPUs (auto = all, a count, or a list like 0,1); without GPUs a count of CPU "
             "processes (auto = 1).",
    ),
    num_nodes: int = typer.Option(
        1, "--num-nodes",
        help="Machines training together: run this command on each with NODE_RANK (0..N-1), MASTER_ADDR "
             "(node 0's address), MASTER_PORT and WORLD_SIZE (devices x nodes) in the environment.",
    ),
    strategy: TrainStrategy = typer.Option(
        TrainStrategy.auto, "--strategy", help="auto: DDP when more than one process; ddp: DDP always.",
    ),
    precision: str = typer.Option("auto", "--precision", help="auto (bf16-true on CUDA with bf16, else 32-true), or a Lightning value."),
    process_group_backend: Backend | None = typer.Option(None, "--process-group-backend", help="DDP backend (default: nccl on GPUs, gloo on CPU)."),
    seed: int = typer.Option(d.SEED, "--seed", help="Seed of the sampling and of the adapter initialisation."),
    resume: str = typer.Option("auto", "--resume", help="auto: continue from the newest valid checkpoint of PROJECT; never; or a checkpoint path."),
    init_lora: Path | None = typer.Option(None, "--init-lora", help="Start a NEW run from the adapters of this checkpoint."),
    save_top_k: int = typer.Option(d.SAVE_TOP_K, "--save-top-k", help="Keep the latest K checkpoints."),
    results_dir: Path = typer.Option(Path("results"), "--results-dir", help="Where run folders go."),
    num_workers: int = typer.Option(0, "--num-workers", help="Data-loader worker processes that build training samples (0: in the main process)."),
) -> None:
    """Finetune a Fish Speech 1.4 text2semantic checkpoint with LoRA on packed shards."""
    from fish_speech_core.finetune.limits import TrainError, base_max_seq_len, resolve_max_length

    if base.is_dir():
        # train()'s first base check, before Lightning is even imported: a bad base or a --max-length
        # it cannot attend to is refused in the time the CLI takes to start. (The shards-vs-base
        # check reads every shard, so it is left to train(), which makes it before any model.)
        try:
            resolve_max_length(max_length, base_max_seq_len(base), base)
        except TrainError as err:
            _fail(str(err))

    from fish_speech_core.files import DiskFullError
    from fish_speech_core.finetune.lora import LoraError
    from fish_speech_core.finetune.module import TrainConfig
    from fish_speech_core.finetune.train import train
    from fish_speech_core.weights import WeightsError

    settings = _lora_settings(lora, lora_r, lora_alpha, lora_dropout)
    config = TrainConfig(
        project=project, base=str(base), data=tuple(str(d) for d in data),
        lora_r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
        max_steps=max_steps, batch_size=batch_size, accumulate_grad_batches=accumulate_grad_batches,
        max_length=max_length, sampling=sampling.value, lr=lr, val_check_interval=val_check_interval, max_val_batches=max_val_batches,
        val_fraction=val_fraction, devices=devices, num_nodes=num_nodes, strategy=strategy.value, precision=precision,
        process_group_backend=process_group_backend.value if process_group_backend else None,
        seed=seed, save_top_k=save_top_k, results_dir=str(results_dir),
        init_lora=str(init_lora) if init_lora else None, num_workers=num_workers,
    )
    try:
        result = train(config, resume=resume)
    except (TrainError, LoraError, WeightsError) as err:
        _fail(str(err))
    except DiskFullError as err:  # a checkpoint (CheckpointWriteError) or history/summary file
        _fail(str(err))
    if result.rank == 0:
        _print_summary(result)
    else:  # rank 0 prints the run's summary; the others say that they took part
        resumed = f", resumed from {result.resumed_from.name}" if result.resumed_from else ""
        typer.echo(f"rank {result.rank} of {result.world_size}: trained to step {result.final_step}{resumed}")


def _print_summary(result) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console()
    for note in result.notes:
        console.print(f"note: {note}", markup=False)
    table = Table(title=Text(f"{result.run_dir} — final step {result.final_step}"))
    for col in ("step", "train loss", "val loss", "top-5 acc"):
        table.add_column(col, justify="right")
    for row in result.history:
        train_loss = "-" if row["train_loss"] is None else f"{row['train_loss']:.4f}"
        table.add_row(str(row["step"]), train_loss, f"{row['val_loss']:.4f}", f"{row['top_5_accuracy']:.3f}")
    console.print(table)
    if result.coverage:
        seen = Table(title="sentences seen / sentences in the training split")
        for col, justify in (("speaker", "left"), ("seen", "right"), ("sentences", "right"), ("share", "right")):
            seen.add_column(col, justify=justify)
        for speaker, row in sorted(result.coverage.items()):
            share = row["seen"] / row["sentences"] if row["sentences"] else 0.0
            seen.add_row(Text(speaker), str(row["seen"]), str(row["sentences"]), f"{share:.0%}")
        console.print(seen)
    if result.num_truncated:
        console.print(f"{result.num_truncated} samples were cut to --max-length")
    rec = result.recommendation
    if rec is not None:
        console.print(
            f"recommended: step {rec.step} (val loss {rec.val_loss:.4f}; best {rec.best_val_loss:.4f} "
            f"at step {rec.best_step}) -> {rec.checkpoint} ({rec.note})", markup=False
        )
    console.print(f"summary: {result.run_dir / 'summary.json'}", markup=False)


def merge_command(
    lora_config: str = typer.Option(d.LORA_PRESET, "--lora-config", help="LoRA preset the adapter was trained with."),
    base_weight: Path = typer.Option(..., "--base-weight", help="Base checkpoint folder the adapter was trained on."),
    lora_weight: Path = typer.Option(..., "--lora-weight", help="Adapter checkpoint (ours or a reference Lightning .ckpt)."),
    output: Path = typer.Option(..., "--output", help="Folder for the merged checkpoint (not the base folder)."),
    lora_r: int | None = typer.Option(None, "--lora-r", help="Override the preset's rank."),
    lora_alpha: float | None = typer.Option(None, "--lora-alpha", help="Override the preset's alpha."),
    lora_dropout: float | None = typer.Option(None, "--lora-dropout", help="Override the preset's dropout."),
    fmt: Format = typer.Option(Format.pth, "--format", help="Weights file: pth (model.pth, what Fish Speech loads) or safetensors."),
) -> None:
    """Fold a LoRA adapter into its base and write a plain checkpoint folder, verified."""
    from fish_speech_core.finetune.lora import LoraError
    from fish_speech_core.finetune.merge import MergeError, merge_checkpoint
    from fish_speech_core.lm import ConfigError
    from fish_speech_core.tokenizer import TokenizerError
    from fish_speech_core.weights import WeightsError

    settings = _lora_settings(lora_config, lora_r, lora_alpha, lora_dropout)
    try:
        report = merge_checkpoint(base_weight, lora_weight, output, settings, fmt.value)
    except (MergeError, LoraError, WeightsError, ConfigError, TokenizerError) as err:  # CheckpointError is a WeightsError
        _fail(str(err))
    typer.echo(
        f"merged {lora_weight} into {base_weight} -> {report.output}: {report.changed_tensors}/"
        f"{report.total_tensors} tensors changed, merged vs base+LoRA max logit diff "
        f"{report.max_logit_diff:.2e}"
        + ("" if report.adapter_metadata else " (adapter carried no metadata: settings from --lora-config)")
    )


def _fail(message: str) -> None:
    typer.echo(f"Error: {message}", err=True)
    raise typer.Exit(code=1)


def register(app: typer.Typer) -> None:
    app.command("train")(train_command)
    app.command("merge")(merge_command)
