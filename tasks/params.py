"""One frozen parameter model per stage: built once in the flow, passed whole to the child flow,
the pool launcher and the task.

Each model says which of its fields change the stage's output (they are in the stage's key) and
which only change how the work is done (``RUN_ONLY``: worker counts, device, batch size, progress
cadence). Defaults come from the core, where each is defined once.
"""

from __future__ import annotations

from enum import Enum
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

from fish_speech_core import defaults as d
from fish_speech_core.choices import AudioFormat, Backend, Sampling, TrainStrategy, CodecDtype as Dtype  # shared with the CLI and the core
from fish_speech_core.finetune.presets import preset_settings


class Preset(str, Enum):
    """LoRA training presets (fish_speech_core/finetune/presets.py)."""

    tiny = "tiny"  # CPU demo and tests: r=4, batch 2, max length 256, validate every 10 steps
    small = "small"  # the Fish Speech 1.4 recipe: r=8 alpha=16, batch 8, validate every 100 steps
    large = "large"  # r=32 alpha=64


PROJECT = "demo"  # the default project name


class StageParams(BaseModel):
    """Base: frozen, no unknown fields; ``key_fields`` is what the stage's key hashes."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    RUN_ONLY: ClassVar[frozenset[str]] = frozenset()

    def key_fields(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude=set(self.RUN_ONLY))


MAX_SECONDS = Field(d.MAX_SECONDS, gt=0.5, le=600.0, description="Reject clips longer than this many seconds.")
TEXT_EXTENSION = Field(d.TEXT_EXTENSION, pattern=r"^\.[A-Za-z0-9]+$", description="Transcript file extension.")
PROCESSES = Field(1, ge=1, le=64, description="Worker processes (validate / normalize / pack).")
MEMORY_PATTERN = r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|K|M|G|T)?$"  # bytes, or a Kubernetes-style quantity
MEMORY = Field(
    None, pattern=MEMORY_PATTERN,
    description="Memory of this stage's container on a docker or kubernetes GPU pool, e.g. 16Gi or 32G (Gi = 2^30 "
                "bytes, G = 10^9). Empty: the pool's default. Unused in this process and on process pools.",
)


class ValidateParams(StageParams):
    RUN_ONLY: ClassVar[frozenset[str]] = frozenset({"num_workers"})
    max_seconds: float = MAX_SECONDS
    text_extension: str = TEXT_EXTENSION
    num_workers: int = PROCESSES


class NormalizeParams(StageParams):
    RUN_ONLY: ClassVar[frozenset[str]] = frozenset({"num_workers"})
    peak: float = Field(d.PEAK_DBFS, ge=-30.0, le=0.0, description="Peak target in dBFS before the loudness gain; also the anti-clipping ceiling.")
    loudness: float = Field(d.LOUDNESS_LUFS, ge=-70.0, le=0.0, description="Integrated loudness target in LUFS (ITU-R BS.1770-4).")
    format: AudioFormat = Field(AudioFormat.keep, description="Output audio format: keep the input's, or convert to flac / wav.")
    max_seconds: float = MAX_SECONDS
    text_extension: str = TEXT_EXTENSION
    num_workers: int = PROCESSES


class ExtractParams(StageParams):
    RUN_ONLY: ClassVar[frozenset[str]] = frozenset({"batch_size", "num_workers", "device", "memory"})
    text_extension: str = TEXT_EXTENSION
    max_seconds: float = MAX_SECONDS
    dtype: Dtype = Field(Dtype.fp32, description="Encoder precision: fp32 (codes equal to the reference's) or bf16.")
    batch_size: int | None = Field(
        None, ge=1, le=1024,
        description="Files per encoder batch. Empty: 1 on CPU (capped at 60 s of padded audio), 16 on CUDA.",
    )
    num_workers: int = Field(
        d.EXTRACT_DECODE_WORKERS, ge=0, le=64,
        description="Data-loader worker processes that decode audio for extraction while the codec encodes (0: one thread of the extracting process, alongside).",
    )
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="auto, cpu, cuda or cuda:N.")
    memory: str | None = MEMORY


class PackParams(StageParams):
    RUN_ONLY: ClassVar[frozenset[str]] = frozenset({"num_workers"})
    text_extension: str = TEXT_EXTENSION
    shard_size_mb: float = Field(d.SHARD_SIZE_MB, gt=0, le=10_000, description="Target size of one .protos shard.")
    num_workers: int = PROCESSES


class TrainParams(StageParams):
    # How the training is spread (devices, nodes, strategy, backend, rendezvous) is run-only: the
    # global batch is split over the processes, so any layout trains the same adapters (within
    # float rounding, 1e-6 in tests/finetune/test_train_distributed.py), and a run folder trained
    # on one GPU resumes on eight.
    RUN_ONLY: ClassVar[frozenset[str]] = frozenset({
        "progress_every", "project", "memory", "devices", "num_nodes", "strategy", "process_group_backend",
        "master_addr", "master_port"})
    project: str = Field(PROJECT, description="Project the run belongs to (names the progress artifacts only).")
    preset: Preset = Field(Preset.small, description="LoRA training preset.")
    max_steps: int = Field(d.MAX_STEPS, gt=0, le=1_000_000, description="Training steps.")
    max_length: int | None = Field(
        None, ge=20, le=1_000_000,
        description="Tokens per training sample. Empty: the preset's (tiny 256, else 4096), capped at the base's "
                    "max_seq_len. A value over the base's max_seq_len fails before any stage.",
    )
    sampling: Sampling = Field(
        Sampling.cover,
        description="Training sample placement: cover (every clip of every speaker, near-equally often) or "
                    "reference (Fish Speech 1.4's rule: speakers shorter than max_length/20 clips always start "
                    "at their first clip).",
    )
    seed: int = Field(d.SEED, ge=0, description="Seed of the training sample stream and the adapter init.")
    progress_every: int = Field(10, ge=1, le=100_000, description="Report training progress (UI and logs) every this many steps.")
    memory: str | None = MEMORY
    devices: str = Field(
        "auto", pattern=r"^(auto|[1-9][0-9]*|[0-9]+(,[0-9]+)+)$",
        description="Training processes per node: GPUs (auto = all, a count, or indices like 0,1); on a machine "
                    "without GPUs a count of CPU processes (auto = 1). The preset's batch is the global batch, "
                    "split over devices x num_nodes: more devices train faster, not differently.",
    )
    num_nodes: int = Field(
        1, ge=1, le=256,
        description="Machines training together: one train child run per node on the GPU pool (needs gpu_pool "
                    "and master_addr).",
    )
    strategy: TrainStrategy = Field(TrainStrategy.auto, description="auto: DDP when more than one process; ddp: DDP always.")
    process_group_backend: Backend | None = Field(
        None, description="torch.distributed backend of DDP. Empty: nccl on GPUs, gloo on CPU.")
    master_addr: str | None = Field(
        None, pattern=r"^[A-Za-z0-9.:\[\]_-]+$",
        description="With num_nodes > 1: the address at which the other nodes reach node 0's train job (MASTER_ADDR).",
    )
    master_port: int = Field(29500, ge=1, le=65535, description="With num_nodes > 1: the port node 0 listens on (MASTER_PORT).")

    @model_validator(mode="after")
    def _nodes_need_a_layout(self) -> "TrainParams":
        if self.num_nodes > 1 and not self.master_addr:
            raise ValueError(f"num_nodes {self.num_nodes} needs master_addr: the address node 0's train job is "
                             f"reachable at from the other nodes")
        if self.num_nodes > 1 and self.devices == "auto":
            raise ValueError(f"num_nodes {self.num_nodes} needs devices as a count (or a list): every node must "
                             f"know the world size before it starts")
        return self

    def processes_per_node(self) -> int | None:
        """Processes each node runs; None for ``auto`` (all the GPUs the host has)."""
        if self.devices == "auto":
            return None
        return len(self.devices.split(",")) if "," in self.devices else int(self.devices)

    def key_fields(self) -> dict[str, Any]:
        # the preset's expanded settings: editing a preset invalidates what it trained
        return {**super().key_fields(), "settings": preset_settings(self.preset.value)}


class EvaluateParams(StageParams):
    sentences_per_speaker: int = Field(
        3, ge=1, le=20,
        description="Held-out sentences rendered per speaker and checkpoint (each speaker's own clip is the voice prompt).",
    )
    max_new_tokens: int = Field(1024, ge=8, le=8192, description="Most code frames generated per preview sentence (~21.5 per second of audio).")
    seed: int = Field(d.SEED, ge=0, description="Seed of the preview sampling.")
    max_references: int = Field(8, ge=1, le=100, description="Real clips per speaker the similarity is measured against.")
    text_extension: str = TEXT_EXTENSION
    asr: str | None = Field(None, description="ASR engine for a word-error-rate score ('pocketsphinx' or 'module:factory').")


class MergeParams(StageParams):
    RUN_ONLY: ClassVar[frozenset[str]] = frozenset({"project", "train_key"})
    project: str = Field(PROJECT, description="Project whose versioned models folder receives the merge.")
    train_key: str = Field("", description="Key of the training run the adapter comes from (lineage).")
