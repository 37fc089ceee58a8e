"""The finetune flow's parameters: one pydantic model, so the Prefect UI renders a validated form.

Field descriptions double as CLI help (``fishtune finetune --help``) and UI help text.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fish_speech_core import storage
from fish_speech_core.defaults import DATA_ITEMS_PER_SHARD, DATA_MAX_SHARDS
from fish_speech_core.evaluate.asr import SPEC_PATTERN as ASR_SPEC_PATTERN
from fish_speech_core.files import refuse_overlap
from fish_speech_core.sharding import shards_for
from fish_speech_core.storage import DEFAULT_ROOT, is_local, local_path, refuse_credentials
from fishtune.tasks.params import (
    MEMORY_PATTERN,
    PROJECT,
    AudioFormat,
    Backend,
    EvaluateParams,
    ExtractParams,
    MergeParams,
    NormalizeParams,
    PackParams,
    Preset,
    Sampling,
    TrainParams,
    TrainStrategy,
    ValidateParams,
)

# Field() of a stage's parameter model, reused so the description and limits are written once
_extract, _train, _evaluate = ExtractParams.model_fields, TrainParams.model_fields, EvaluateParams.model_fields


class NormalizeOptions(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    loudness: float = NormalizeParams.model_fields["loudness"]
    peak: float = NormalizeParams.model_fields["peak"]
    format: AudioFormat = NormalizeParams.model_fields["format"]


def _container_memory(stage: str, example: str):
    """The memory setting of a GPU stage's container (docker / kubernetes pools)."""
    return Field(None, pattern=MEMORY_PATTERN,
                 description=f"With gpu_pool on a docker or kubernetes pool: memory of the {stage} container, "
                             f"e.g. {example}. Empty: the pool's default.")


class FinetuneConfig(BaseModel):
    """Everything a finetune run needs; validated before any work starts."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    project: str = Field(
        PROJECT, min_length=1, max_length=64, pattern=r"^[a-z0-9][a-z0-9-]*$",
        description="Project name (lowercase letters, digits, dashes): groups the runs and versioned models of one voice.",
    )
    data: str = Field(
        ..., min_length=1,
        description="Dataset root: a local folder or s3://bucket/prefix holding one folder per speaker of audio + .lab transcripts.",
    )
    speaker: str | None = Field(
        None, description="Use only this speaker's folder. Empty: every speaker."
    )
    storage: str = Field(
        DEFAULT_ROOT, validate_default=True,
        description="Artifact store root: a local folder or s3://bucket/prefix. Credentials and endpoint come from the AWS environment only.",
    )
    work_dir: str | None = Field(
        None, description="Local scratch folder of this run's host for incremental work. Empty: the folder 'work' "
                          "inside a local storage root, ~/.cache/fishtune/work for s3, or the host's FISHTUNE_WORK_DIR. "
                          "GPU child runs always use their own host's.",
    )
    max_seconds: float = ValidateParams.model_fields["max_seconds"]
    text_extension: str = ValidateParams.model_fields["text_extension"]
    normalize: NormalizeOptions = Field(default_factory=NormalizeOptions, description="Loudness normalization.")
    num_workers: int = Field(1, ge=1, le=64, description="Worker processes of validate, normalize and pack.")
    base: str | None = Field(None, description="Base model folder or URL (Fish Speech 1.4 LLaMA checkpoint + tokenizer).")
    codec: str | None = Field(None, description="Firefly VQ-GAN codec checkpoint (path or URL) for semantic token extraction.")
    extract_batch_size: int | None = _extract["batch_size"]
    extract_num_workers: int = _extract["num_workers"]
    extract_memory: str | None = _container_memory("extract", "16Gi or 32G")
    preset: Preset = _train["preset"]
    max_steps: int = _train["max_steps"]
    max_length: int | None = _train["max_length"]
    sampling: Sampling = _train["sampling"]
    seed: int = _train["seed"]
    progress_every: int = _train["progress_every"]
    train_memory: str | None = _container_memory("train", "32Gi")
    devices: str = _train["devices"]
    num_nodes: int = _train["num_nodes"]
    strategy: TrainStrategy = _train["strategy"]
    process_group_backend: Backend | None = _train["process_group_backend"]
    master_addr: str | None = _train["master_addr"]
    master_port: int = _train["master_port"]
    evaluate: bool = Field(False, description="Render and score previews of the base and every kept checkpoint; merge the one they recommend.")
    preview_sentences_per_speaker: int = Field(
        _evaluate["sentences_per_speaker"].default, ge=1, le=20,
        description="With evaluate: held-out sentences rendered per speaker and checkpoint (each speaker's own clip is the voice prompt).",
    )
    preview_max_new_tokens: int = Field(
        _evaluate["max_new_tokens"].default, ge=8, le=8192,
        description="With evaluate: most code frames generated per preview sentence (~21.5 per second of audio).",
    )
    asr: str | None = Field(
        None, pattern=ASR_SPEC_PATTERN,
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
        None, description="Run the GPU stages (extract, train, evaluate, merge) as child runs of their deployments, "
                          "which must be on this work pool (e.g. 'cuda'). Empty: in this process.",
    )
    extract_shards: int | None = Field(
        None, ge=1, le=1024,
        description="With gpu_pool: split extraction into this many child runs at once (one GPU each), merged into "
                    "the same artifact one run makes; a rerun after a failed shard runs that shard alone. Empty: one "
                    "per slot of the `gpu` concurrency limit (fishtune deploy --gpus). Without gpu_pool only 1.",
    )

    cpu_pool: str | None = Field(
        None, description="Run validate and normalize as child runs of the validate-shard and normalize-shard "
                          "deployments, which must be on this work pool (e.g. 'cpu'), when the data is large (see "
                          "data_shards); its workers read the data folder the run fetched (one host or a shared "
                          "filesystem). Empty: in this process.",
    )
    data_shards: int | None = Field(
        None, ge=1, le=1024,
        description="With cpu_pool: split validate and normalize each into this many child runs at once, merged "
                    "into the same artifact one run makes; a rerun after a failed shard runs that shard alone. "
                    f"Empty: one per {DATA_ITEMS_PER_SHARD} clips (found ones for validate, accepted ones for "
                    f"normalize; at most {DATA_MAX_SHARDS}), so data of up to {DATA_ITEMS_PER_SHARD} clips stays "
                    "in-process. Without cpu_pool only 1.",
    )

    @field_validator("data", "storage", "work_dir", "base", "codec")
    @classmethod
    def _no_credentials_and_absolute(cls, value: str | None) -> str | None:
        # Credentials are refused before the flow starts: Prefect would store the parameters (and
        # every log line that echoes them) in its database. Local paths become absolute here, where
        # the run is submitted: a worker on another folder (or host) must not resolve them anew.
        if value is None:
            return None
        value = refuse_credentials(value)
        return str(local_path(value).expanduser().absolute()) if is_local(value) else value

    def manifest_parameters(self) -> dict:
        """The parameters as a run manifest records them: JSON, every URL without user info."""
        parameters = self.model_dump(mode="json")
        for name in ("data", "storage", "base", "codec", "work_dir"):
            if parameters.get(name):
                parameters[name] = storage.redact(parameters[name])
        return parameters

    def validate_params(self) -> ValidateParams:
        return ValidateParams(max_seconds=self.max_seconds, text_extension=self.text_extension, num_workers=self.num_workers)

    def normalize_params(self) -> NormalizeParams:
        return NormalizeParams(**self.normalize.model_dump(), max_seconds=self.max_seconds,
                               text_extension=self.text_extension, num_workers=self.num_workers)

    def extract_params(self) -> ExtractParams:
        return ExtractParams(text_extension=self.text_extension, max_seconds=self.max_seconds,
                             batch_size=self.extract_batch_size, num_workers=self.extract_num_workers,
                             memory=self.extract_memory)

    def pack_params(self) -> PackParams:
        return PackParams(text_extension=self.text_extension, num_workers=self.num_workers)

    def train_params(self) -> TrainParams:
        return TrainParams(project=self.project, preset=self.preset, max_steps=self.max_steps, max_length=self.max_length,
                           sampling=self.sampling, seed=self.seed, progress_every=self.progress_every,
                           memory=self.train_memory,
                           devices=self.devices, num_nodes=self.num_nodes, strategy=self.strategy,
                           process_group_backend=self.process_group_backend, master_addr=self.master_addr,
                           master_port=self.master_port)

    def evaluate_params(self) -> EvaluateParams:
        return EvaluateParams(sentences_per_speaker=self.preview_sentences_per_speaker,
                              max_new_tokens=self.preview_max_new_tokens, seed=self.seed,
                              text_extension=self.text_extension, asr=self.asr)

    def merge_params(self, train_key: str = "") -> MergeParams:
        return MergeParams(project=self.project, train_key=train_key)

    def workspace(self) -> str:
        """The name of this dataset's incremental extraction folder: where the data is, which
        speaker, how it was normalized (not its content: the next run redoes changed files only)."""
        return storage.digest_listing({"data": storage.normalize_url(self.data), "speaker": self.speaker or "",
                                       "normalize": storage.canonical_json(self.normalize.model_dump(mode="json"))})[:16]

    @model_validator(mode="after")
    def _shards_need_a_pool(self) -> FinetuneConfig:
        for shards, pool, kind, example in (("extract_shards", "gpu_pool", "GPU", "cuda"),
                                            ("data_shards", "cpu_pool", "CPU", "cpu")):
            k = getattr(self, shards)
            if k and k > 1 and not getattr(self, pool):
                raise ValueError(f"{shards} {k} needs {pool}: shards are child runs on the {kind} pool's workers; "
                                 f"set {pool} (e.g. '{example}') or leave {shards} empty")
        return self

    def data_shards_for(self, clips: int) -> int:
        """K, the child runs of a CPU data stage (validate, normalize) for ``clips`` clips:
        ``data_shards``, else one per DATA_ITEMS_PER_SHARD clips (at most DATA_MAX_SHARDS) with a
        cpu pool; 1 without one."""
        if not self.cpu_pool:
            return 1
        return self.data_shards or shards_for(clips, DATA_ITEMS_PER_SHARD, DATA_MAX_SHARDS)

    @model_validator(mode="after")
    def _nodes_run_on_the_pool(self) -> FinetuneConfig:
        # one process cannot be several machines: each node is a child run of the train deployment
        if self.num_nodes > 1 and not self.gpu_pool:
            raise ValueError(f"num_nodes {self.num_nodes} needs gpu_pool: each node trains in its own child run")
        try:
            self.train_params()  # TrainParams' own checks (master_addr, devices), before any stage
        except ValidationError as err:
            raise ValueError("; ".join(e["msg"].removeprefix("Value error, ") for e in err.errors())) from None
        return self

    @model_validator(mode="after")
    def _outputs_outside_data(self) -> FinetuneConfig:
        # The store and the work folder are written (and swept); the dataset never is.
        if is_local(self.data):
            for flag, url in (("--storage", self.storage), ("--work-dir", self.work_dir)):
                if url is not None and is_local(url):
                    refuse_overlap([("--data", local_path(self.data))], local_path(url), flag)
        return self
