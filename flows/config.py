"""The finetune flow's parameters: one pydantic model, so the Prefect UI renders a validated form.

Field descriptions double as CLI help (``fishtune finetune --help``) and UI help text.
"""

from __future__ import annotations

from enum import Enum

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fish_speech_core.choices import AudioFormat, Sampling  # shared with the CLI and the core
from fish_speech_core.files import refuse_overlap
from fish_speech_core.storage import DEFAULT_ROOT, is_local, local_path, refuse_credentials


class Preset(str, Enum):
    """LoRA training presets (settings in tasks/train.py:PRESETS)."""

    tiny = "tiny"  # CPU demo and tests: r=4, batch 2, max length 256, validate every 10 steps
    small = "small"  # the Fish Speech 1.4 recipe: r=8 alpha=16, batch 8, validate every 100 steps
    large = "large"  # r=32 alpha=64


class NormalizeOptions(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    loudness: float = Field(-23.0, ge=-70.0, le=0.0, description="Integrated loudness target in LUFS (ITU-R BS.1770-4).")
    peak: float = Field(-1.0, ge=-30.0, le=0.0, description="Peak target in dBFS before the loudness gain; also the anti-clipping ceiling.")
    format: AudioFormat = Field(AudioFormat.keep, description="Output audio format: keep the input's, or convert to flac / wav.")


class FinetuneConfig(BaseModel):
    """Everything a finetune run needs; validated before any work starts."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    project: str = Field(
        "demo", min_length=1, max_length=64, pattern=r"^[a-z0-9][a-z0-9-]*$",
        description="Project name (lowercase letters, digits, dashes): groups the runs and versioned models of one voice.",
    )
    data: str = Field(
        ..., min_length=1,
        description="Dataset root: a local folder or s3://bucket/prefix holding one folder per speaker of audio + .lab transcripts.",
    )
    speaker: str | None = Field(
        None, description="Use only this speaker's folder (what the data-landed trigger sets). Empty: every speaker."
    )
    storage: str = Field(
        DEFAULT_ROOT,
        description="Artifact store root: a local folder or s3://bucket/prefix. Credentials and endpoint come from the AWS environment only.",
    )
    work_dir: str | None = Field(
        None, description="Local scratch folder for incremental work. Empty: <storage>/work locally, ~/.cache/fishtune/work for s3.",
    )
    max_seconds: float = Field(30.0, gt=0.5, le=600.0, description="Reject clips longer than this many seconds.")
    text_extension: str = Field(".lab", pattern=r"^\.[A-Za-z0-9]+$", description="Transcript file extension.")
    normalize: NormalizeOptions = Field(default_factory=NormalizeOptions, description="Loudness normalization.")
    num_workers: int = Field(1, ge=1, le=64, description="Worker processes that validate, normalize and pack the files (1: in this process).")
    extract_loader_workers: int = Field(
        1, ge=0, le=64,
        description="Data-loader worker processes that decode audio for extraction while the codec encodes (0: in the main process).",
    )
    base: str | None = Field(None, description="Base model folder or URL (Fish Speech 1.4 LLaMA checkpoint + tokenizer).")
    codec: str | None = Field(None, description="Firefly VQ-GAN codec checkpoint (path or URL) for semantic token extraction.")
    preset: Preset = Field(Preset.small, description="LoRA training preset.")
    max_steps: int = Field(1000, gt=0, le=1_000_000, description="Training steps.")
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
    seed: int = Field(42, ge=0, description="Seed of the training sample stream and the adapter init.")
    progress_every: int = Field(10, ge=1, le=100_000, description="Update the training progress in the Prefect UI every this many steps.")
    evaluate: bool = Field(False, description="Render and score previews of the base and every kept checkpoint; merge the one they recommend.")
    preview_sentences_per_speaker: int = Field(
        3, ge=1, le=20,
        description="With evaluate: held-out sentences rendered per speaker and checkpoint (each speaker's own clip is the voice prompt).",
    )
    preview_max_new_tokens: int = Field(
        1024, ge=8, le=8192,
        description="With evaluate: most code frames generated per preview sentence (~21.5 per second of audio).",
    )
    asr: str | None = Field(
        None, pattern=r"^(pocketsphinx|[A-Za-z_][\w.]*:[A-Za-z_]\w*)$",
        description="With evaluate: an ASR engine for a word-error-rate score of the previews: 'pocketsphinx' "
                    "(English, offline; pip install 'fishtune[asr]') or 'package.module:factory' returning an object "
                    "with transcribe(audio, sample_rate) -> str. Empty: no ASR score.",
    )
    merge_step: int | None = Field(
        None, ge=0,
        description="Merge the kept checkpoint of this training step instead of the recommended one. Empty: the recommended one.",
    )
    warm_start: bool = Field(False, description="Continue from the latest successful LoRA of this project instead of the base.")
    gpu_pool: str | None = Field(
        None, description="Run extract/train as child deployments on this work pool (e.g. 'cuda'). Empty: in this process."
    )

    @field_validator("data", "storage", "work_dir", "base", "codec")
    @classmethod
    def _no_credentials(cls, value: str | None) -> str | None:
        # Refused before the flow starts: Prefect would store the parameters (and every log line
        # that echoes them) in its database.
        return None if value is None else refuse_credentials(value)

    @model_validator(mode="after")
    def _outputs_outside_data(self) -> FinetuneConfig:
        # The store and the work folder are written (and swept); the dataset never is.
        if is_local(self.data):
            for flag, url in (("--storage", self.storage), ("--work-dir", self.work_dir)):
                if url is not None and is_local(url):
                    refuse_overlap([("--data", local_path(self.data))], local_path(url), flag)
        return self
