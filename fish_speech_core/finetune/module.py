"""Lightning parts of LoRA finetuning: the run config, the LightningModule and the DataModule.

The recipe defaults are Fish Speech 1.4's finetune config: AdamW (lr 1e-4, betas 0.9/0.95,
eps 1e-5, weight decay 0, none on biases/norms/embeddings), constant LR after 10 warmup steps,
gradient clipping 1.0 by norm, batch 8, interactive_prob 0.7, use_speaker off.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from fish_speech_core.finetune.data import (
    DEFAULT_SAMPLING,
    SAMPLING_MODES,
    Collator,
    HeldOutDataset,
    SamplingConfig,
    TextSemanticDataset,
    load_groups,
    number_items,
    split_groups,
)
from fish_speech_core.finetune.lora import (
    LoraMetadata,
    LoraSettings,
    lora_parameters,
    lora_state_dict,
)
from fish_speech_core import defaults
from fish_speech_core.allocator import release_freed_memory
from fish_speech_core.choices import Backend, TrainStrategy, values
from fish_speech_core.finetune.dropout import use_sample_dropout
from fish_speech_core.lm.loss import training_loss_sums
from fish_speech_core.lm import DualARTransformer, lm_losses


PRECISIONS = ("auto", "32-true", "32", "bf16-true", "bf16-mixed", "16-true", "16-mixed", "64-true")
STRATEGIES = values(TrainStrategy)  # ("auto", "ddp")
BACKENDS = values(Backend)  # ("gloo", "nccl")
DEVICES_RE = re.compile(r"^(auto|\d+|\d+(,\d+)+)$")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a run; saved as ``config.json`` beside the checkpoints."""

    project: str
    base: str
    data: tuple[str, ...]
    lora_r: int = defaults.LORA_R
    lora_alpha: float = defaults.LORA_ALPHA
    lora_dropout: float = defaults.LORA_DROPOUT
    max_steps: int = defaults.MAX_STEPS
    # The global batch: samples per micro-batch summed over every process (each of the
    # devices x num_nodes processes takes batch_size / world_size of them), so the world size
    # changes the speed, not the result.
    batch_size: int = defaults.BATCH_SIZE
    accumulate_grad_batches: int = 1
    max_length: int | None = None  # None: min(limits.DEFAULT_MAX_LENGTH, the base's max_seq_len)
    lr: float = defaults.LR
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-5
    weight_decay: float = 0.0
    warmup_steps: int = 10
    gradient_clip: float = 1.0
    val_check_interval: int = defaults.VAL_CHECK_INTERVAL
    val_fraction: float = defaults.VAL_FRACTION
    val_batch_size: int = 8
    # Validation reads at most this many batches (the first ones: the loader does not shuffle), so
    # its cost stays flat as the data grows; 0 = the whole held-out set.
    max_val_batches: int = 10
    interactive_prob: float = 0.7
    use_speaker: bool = False
    sampling: str = DEFAULT_SAMPLING  # data.SAMPLING_MODES; docs/train.md, Sampling
    devices: str = "auto"  # per node: GPUs (auto = all, N, or a list "0,1"); on CPU a process count (auto = 1)
    num_nodes: int = 1
    strategy: str = "auto"  # STRATEGIES: auto = DDP when more than one process, ddp = always
    precision: str = "auto"
    process_group_backend: str | None = None  # BACKENDS; None: nccl on GPUs, gloo on CPU
    seed: int = defaults.SEED
    save_top_k: int = defaults.SAVE_TOP_K
    results_dir: str = "results"
    init_lora: str | None = None
    num_workers: int = 0
    base_sha256: str | None = None

    # Fields a resumed run may change; every other field must equal the checkpoint's.
    RESUMABLE_CHANGES = (
        "base",  # the folder may move; base_sha256 must still match
        "max_steps", "devices", "num_nodes", "strategy", "precision", "process_group_backend", "save_top_k",
        "results_dir", "num_workers", "val_check_interval", "val_batch_size", "max_val_batches",
    )

    @property
    def lora(self) -> LoraSettings:
        return LoraSettings(self.lora_r, self.lora_alpha, self.lora_dropout)

    @property
    def run_dir(self) -> Path:
        return Path(self.results_dir) / self.project

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["data"] = list(self.data)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in data.items() if k in known}
        d["data"] = tuple(d["data"])
        d["betas"] = tuple(d.get("betas", (0.9, 0.95)))
        # runs saved before the sampling choice existed sampled with the reference rule
        d.setdefault("sampling", "reference")
        return cls(**d)

    def validate(self) -> list[str]:
        """Every problem with the values, naming the CLI flag."""
        p = []
        for flag, value, low in (
            ("--max-steps", self.max_steps, 1), ("--batch-size", self.batch_size, 1),
            ("--accumulate-grad-batches", self.accumulate_grad_batches, 1),
            ("--val-check-interval", self.val_check_interval, 1), ("--save-top-k", self.save_top_k, 1),
            ("--max-length", 20 if self.max_length is None else self.max_length, 20), ("--lora-r", self.lora_r, 1),
            ("--max-val-batches", self.max_val_batches, 0), ("--num-nodes", self.num_nodes, 1),
        ):
            if value < low:
                p.append(f"{flag} must be >= {low}, got {value}")
        if self.lr <= 0:
            p.append(f"--lr must be > 0, got {self.lr}")
        if self.lora_alpha <= 0:
            p.append(f"--lora-alpha must be > 0, got {self.lora_alpha}")
        if not 0 <= self.lora_dropout < 1:
            p.append(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
        if not 0 < self.val_fraction < 1:
            p.append(f"--val-fraction must be in (0, 1), got {self.val_fraction}")
        if self.sampling not in SAMPLING_MODES:
            p.append(f"--sampling must be one of {list(SAMPLING_MODES)}, got {self.sampling!r}")
        if self.strategy not in STRATEGIES:
            p.append(f"--strategy must be one of {list(STRATEGIES)}, got {self.strategy!r}")
        if self.process_group_backend is not None and self.process_group_backend not in BACKENDS:
            p.append(f"--process-group-backend must be one of {list(BACKENDS)}, got {self.process_group_backend!r}")
        if not DEVICES_RE.match(self.devices) or self.devices == "0":
            p.append(f"--devices must be auto, a count >= 1 or a list of GPU indices like 0,1, got {self.devices!r}")
        if self.precision not in PRECISIONS:
            p.append(f"--precision must be one of {list(PRECISIONS)}, got {self.precision!r}")
        if not self.project or "/" in self.project or self.project.startswith("."):
            p.append(f"--project must be a plain folder name, got {self.project!r}")
        return p

    def mismatches(self, saved: "TrainConfig") -> list[str]:
        """Fields that differ from a checkpoint's config and may not change on resume."""
        out = []
        for f in fields(self):
            if f.name in self.RESUMABLE_CHANGES or f.name in ("init_lora",):
                continue
            mine, theirs = getattr(self, f.name), getattr(saved, f.name)
            if mine != theirs:
                out.append(f"{f.name}: checkpoint has {theirs!r}, now {mine!r}")
        return out


# --- data ------------------------------------------------------------------------------------


class FinetuneData(pl.LightningDataModule):
    """Training stream and held-out split from ``.protos`` shards."""

    def __init__(self, config: TrainConfig, tokenizer, num_codebooks: int) -> None:
        super().__init__()
        if config.max_length is None:
            raise ValueError("max_length is not resolved yet (train() resolves it against the base)")
        self.config = config
        self.tokenizer = tokenizer
        self.num_codebooks = num_codebooks
        self.collator = Collator.from_tokenizer(tokenizer, config.max_length)
        self.notes: list[str] = []
        self.val_fraction = config.val_fraction
        self.num_truncated = 0
        groups = load_groups(config.data)
        self.num_sentences = sum(len(g.items) for g in groups)
        if self.num_sentences == 0:
            raise ValueError(f"no sentences in {list(config.data)}: pack some data with `fishtune pack`")
        val = HeldOutDataset(config.data, tokenizer, config.val_fraction, num_codebooks)
        self.train_uses_all = len(val) == 0 or len(val) == self.num_sentences
        if self.train_uses_all:
            # Too little data to hold any out (e.g. one sentence): validate on the training data.
            self.notes.append(
                f"only {self.num_sentences} sentence(s): no held-out split possible, validation "
                f"uses the training sentences"
            )
            val.items = [item for g in groups for item in g.items]
        self.val_dataset = val
        # The training split as TextSemanticDataset numbers it: Item.index -> speaker, for coverage.
        self.train_groups = number_items(groups if self.train_uses_all else split_groups(groups, config.val_fraction, "train"))

    def sampling(self) -> SamplingConfig:
        return SamplingConfig(
            max_length=self.config.max_length, interactive_prob=self.config.interactive_prob,
            use_speaker=self.config.use_speaker, num_codebooks=self.num_codebooks, mode=self.config.sampling,
        )

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer else (0, 1)
        if self.config.batch_size % world:
            raise ValueError(f"batch {self.config.batch_size} does not split over {world} processes")
        local = self.config.batch_size // world
        # The loop state is restored before the dataloaders are built, so global_step is the
        # resumed step here: the stream starts after the micro-batches already trained on.
        consumed = (trainer.global_step if trainer else 0) * self.config.accumulate_grad_batches
        dataset = TextSemanticDataset(
            self.config.data, self.tokenizer, self.sampling(), seed=self.config.seed,
            rank=rank, world_size=world, batch_size=local, start_batch=consumed,
            val_fraction=0.0 if self.train_uses_all else self.config.val_fraction,
        )
        return DataLoader(
            dataset, batch_size=local, collate_fn=self.collator,
            num_workers=self.config.num_workers, persistent_workers=False,
        )

    def val_dataloader(self) -> DataLoader:
        # Every rank validates on the same batches (no DistributedSampler: it pads with repeats and
        # splits max_val_batches per rank), so every world size logs the same validation loss;
        # capped at max_val_batches, validation takes as long as on one device.
        return DataLoader(
            self.val_dataset, batch_size=self.config.val_batch_size, shuffle=False,
            collate_fn=self.collator, num_workers=0,
        )


# --- model -----------------------------------------------------------------------------------


def no_decay(name: str) -> bool:
    """Biases, norms and embeddings get no weight decay (the reference's rule)."""
    return name.endswith(".bias") or "norm" in name or "embedding" in name


class LoraFinetune(pl.LightningModule):
    """Dual-AR model with LoRA adapters; trains and checkpoints only the adapters."""

    def __init__(self, model: DualARTransformer, config: TrainConfig, metadata: LoraMetadata) -> None:
        super().__init__()
        self.model = model
        self.config = config
        self.metadata = metadata
        # Checkpoints hold only the adapters: the frozen base comes from --base on resume.
        self.strict_loading = False
        self.dropout = use_sample_dropout(model, config.seed)
        self.tokens_seen = 0
        self.num_truncated = 0
        self._micro_batch = 0  # micro-batches trained so far (restored from global_step on resume)
        self._t0: float | None = None
        self.last_train: dict[str, float] = {}
        self.last_val: dict[str, float] = {}
        # Item.index of every training sentence trained on so far (kept in checkpoints, so a
        # resumed run reports the coverage of the whole run).
        self.seen: set[int] = set()

    def _losses(self, batch):
        out = self.model(batch["inputs"], batch["attention_masks"])
        return lm_losses(out.token_logits.float(), out.codebook_logits.float(), batch["labels"])

    def setup(self, stage: str) -> None:
        # Every training process passes here, however Lightning started it (DDP children too).
        release_freed_memory()

    def on_train_start(self) -> None:
        self._micro_batch = self.trainer.global_step * self.config.accumulate_grad_batches

    def on_train_batch_start(self, batch, batch_idx) -> None:
        # LoRA dropout has per-sample generators (finetune.dropout); anything else drawing from
        # the global generators (attention dropout of a base with dropout > 0) is reseeded per
        # micro-batch from (seed, micro-batch, rank), so a resumed run draws like an uninterrupted one.
        mixed = (self.config.seed * 1_000_003 + self._micro_batch) * 1009 + self.global_rank
        torch.manual_seed(mixed % 2**63)
        self._micro_batch += 1

    def training_step(self, batch, batch_idx):
        if self._t0 is None:
            self._t0 = time.perf_counter()
        inputs, padding = batch["inputs"], batch["attention_masks"]
        rows = self.model.fast_rows(inputs)
        self.dropout.set(batch["uids"], (~padding).sum(1).cpu(),
                         torch.bincount(rows // inputs.shape[2], minlength=inputs.shape[0]).cpu())
        # the token head's logits never outlive their forward; the codebook logits take their gradients
        sums = training_loss_sums(self.model, inputs, padding, batch["labels"])
        # One all-reduce of the counts (and, for the logs, the sums) over the ranks. Each rank's
        # loss is its share of the global sums over the global counts, times the world size: DDP
        # averages the gradients over the ranks, so they come out as the gradient of the mean
        # over the whole global batch, what one process holding all of it computes.
        local = torch.cat([sums.stats(), (~padding).sum().double().reshape(1)])
        total = self.trainer.strategy.reduce(local, reduce_op="sum") if self.trainer.world_size > 1 else local
        world = self.trainer.world_size
        text_count = total[1].clamp(min=1).to(sums.text_sum.dtype)
        code_count = total[3].clamp(min=1).to(sums.code_sum.dtype)
        loss = world * (sums.text_sum / text_count + sums.code_sum / code_count)
        base_loss, semantic_loss = float(total[0] / total[1].clamp(min=1)), float(total[2] / total[3].clamp(min=1))
        top_5 = float(total[4] / total[5].clamp(min=1))

        self.tokens_seen += int(total[6])  # every rank's tokens: tokens/s is the run's
        self.num_truncated += int(batch["num_truncated"])
        self.seen.update(batch["sentences"].tolist())
        elapsed = max(time.perf_counter() - self._t0, 1e-9)
        bs = inputs.shape[0]
        self.log("train/loss", base_loss + semantic_loss, prog_bar=True, batch_size=bs)
        self.log("train/base_loss", base_loss, batch_size=bs)
        self.log("train/semantic_loss", semantic_loss, batch_size=bs)
        self.log("train/top_5_accuracy", top_5, batch_size=bs)
        self.log("train/tokens_per_s", self.tokens_seen / elapsed, batch_size=bs)
        self.log("train/truncated", float(self.num_truncated), batch_size=bs)
        self.last_train = {"loss": base_loss + semantic_loss, "tokens_per_s": self.tokens_seen / elapsed}
        return loss

    def validation_step(self, batch, batch_idx):
        losses = self._losses(batch)
        bs = batch["inputs"].shape[0]
        self.log("val/loss", losses.loss, sync_dist=True, batch_size=bs)
        self.log("val/base_loss", losses.base_loss, sync_dist=True, batch_size=bs)
        self.log("val/semantic_loss", losses.semantic_loss, sync_dist=True, batch_size=bs)
        self.log("val/top_5_accuracy", losses.top_5_accuracy, sync_dist=True, batch_size=bs)

    def on_before_optimizer_step(self, optimizer) -> None:
        # Called before Lightning clips: this is the raw norm.
        grads = [p.grad.detach().float().norm() for _, p in lora_parameters(self.model) if p.grad is not None]
        if grads:
            self.log("train/grad_norm", torch.stack(grads).norm())
        self.log("train/lr", optimizer.param_groups[0]["lr"])

    def configure_optimizers(self):
        c = self.config
        params = lora_parameters(self.model)
        groups = [
            {"params": [p for n, p in params if not no_decay(n)], "weight_decay": c.weight_decay},
            {"params": [p for n, p in params if no_decay(n)], "weight_decay": 0.0},
        ]
        optimizer = torch.optim.AdamW(groups, lr=c.lr, betas=c.betas, eps=c.eps)
        warmup = c.warmup_steps

        def factor(step: int) -> float:  # linear warmup, then constant
            return min(1.0, step / warmup) if warmup > 0 else 1.0

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"] = {f"model.{k}": v for k, v in lora_state_dict(self.model).items()}
        checkpoint["fishtune_lora"] = self.metadata.to_dict()
        checkpoint["fishtune_config"] = self.config.to_dict()
        checkpoint["fishtune_seen"] = self.all_seen()
        checkpoint.pop("hyper_parameters", None)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.seen = set(checkpoint.get("fishtune_seen", []))

    def all_seen(self) -> list[int]:
        """The sentences trained on by every rank (each rank samples its own share), sorted."""
        return self.run_totals()[0]

    def run_totals(self) -> tuple[list[int], int]:
        """(sentences trained on, samples cut to max_length) over every rank: a collective, so
        every rank calls it."""
        seen, truncated = self.seen, self.num_truncated
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            parts: list = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(parts, (sorted(seen), truncated))
            seen = set().union(*(set(p[0]) for p in parts))
            truncated = sum(p[1] for p in parts)
        return sorted(seen), truncated

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        from fish_speech_core.finetune.lora import load_lora_state_dict

        load_lora_state_dict(self.model, state_dict)
        return None
