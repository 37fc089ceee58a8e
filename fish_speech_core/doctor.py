"""Environment and compatibility checks behind ``fishtune doctor``.

Every check returns :class:`Finding` s (level, what, what_to_do) instead of raising, so one run
reports every problem at once. The expensive parts are avoided: checkpoints are opened with
``weights_only=True, mmap=True`` and only their config is read, no model is built.

The base/codec rule (why users mixing 1.2 and 1.4 files hit index errors deep in training):
the LM predicts ``num_codebooks`` rows of codes per frame, each in ``[0, codebook_size)``; the
codec's FSQ quantizer produces ``n_groups x n_codebooks`` rows with values in
``[0, prod(levels))``. Fish Speech 1.4 is 8 rows of 8*5*5*5 = 1000 levels in a 1024-way head
(the next power of two). So the row counts must be equal and ``codebook_size`` must be the
next power of two at or above ``prod(levels)``.
"""

from __future__ import annotations

import json
import math
import os
import platform
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from fish_speech_core.codes import CodeSpec, fit_problems
from fish_speech_core.meta import on_meta

Level = Literal["ok", "info", "warning", "error"]


@dataclass(frozen=True)
class Finding:
    level: Level
    what: str
    what_to_do: str = ""


def has_errors(findings: list[Finding]) -> bool:
    return any(f.level == "error" for f in findings)


# ---------------------------------------------------------------- environment


def check_environment() -> list[Finding]:
    """Versions of Python/torch/torchaudio/Prefect, CUDA, GPU name and memory, bf16 support."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    found = [Finding("info", f"Python {platform.python_version()} ({platform.machine()})")]
    for name, needed in (("torch", True), ("torchaudio", True), ("prefect", False)):
        try:
            found.append(Finding("info", f"{name} {version(name)}"))
        except PackageNotFoundError:
            if needed:
                found.append(Finding("error", f"{name} is not installed", f"pip install {name}"))
            else:
                found.append(
                    Finding("warning", f"{name} is not installed: the flows cannot run",
                            "pip install 'fishtune[flows]' (or prefect) to use `fishtune finetune`")
                )
    if not torch.cuda.is_available():
        found.append(
            Finding("warning", f"no CUDA GPU (torch built with CUDA {torch.version.cuda})",
                    "training and extraction run on CPU: fine for the tiny presets and tests, "
                    "slow for the real model; use a CUDA machine for real finetunes")
        )
        return found
    found.append(Finding("info", f"CUDA {torch.version.cuda}, {torch.cuda.device_count()} device(s)"))
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        gib = props.total_memory / 2**30
        found.append(Finding("info", f"GPU {index}: {props.name}, {gib:.1f} GiB"))
        if gib < 12:
            found.append(
                Finding("warning", f"GPU {index} has {gib:.1f} GiB; the fish-speech-1.4 LoRA "
                        "finetune needs about 12+ GiB at batch 1",
                        "lower --batch-size / --max-length or use a larger GPU")
            )
    if torch.cuda.is_bf16_supported():
        found.append(Finding("ok", "bf16 supported"))
    else:
        found.append(
            Finding("warning", "this GPU has no bf16 support",
                    "train with --precision 32 (or fp16 mixed); bf16-mixed will fail or be slow")
        )
    return found


# ---------------------------------------------------------------- base checkpoint


def _base_config(base_dir: Path, found: list[Finding]):
    from fish_speech_core.lm.config import DualARConfig

    file = base_dir / "config.json"
    if not file.is_file():
        found.append(
            Finding("error", f"{file} not found",
                    "--base must be a Fish Speech 1.4 checkpoint folder (config.json, model.pth, "
                    "tokenizer.json), e.g. from `huggingface-cli download fishaudio/fish-speech-1.4` "
                    "or `fishtune init-base`")
        )
        return None
    try:
        return DualARConfig.from_file(file)
    except Exception as err:  # noqa: BLE001 - report, do not crash the doctor
        found.append(Finding("error", f"{file}: {err}", "use the config.json shipped with the checkpoint"))
        return None


def _check_weights(weights: Path, config) -> list[Finding]:
    """model.pth opens as tensors (weights_only, memory-mapped) with the keys and shapes of ``config``."""
    import torch

    from fish_speech_core.lm.checkpoint import normalize_state_dict, state_dict_problems
    from fish_speech_core.lm.model import DualARTransformer
    from fish_speech_core.weights import WeightsError, read_weights

    fix = "download the checkpoint again (or re-run `fishtune init-base` / `fishtune merge`)"
    try:
        state = normalize_state_dict(read_weights(weights))
    except WeightsError as err:
        return [Finding("error", str(err) if str(weights) in str(err) else f"{weights}: {err}", fix)]
    if not state:
        return [Finding("error", f"{weights} holds no tensors", fix)]
    if config is None:
        return [Finding("info", f"{weights}: {len(state)} tensors (config.json unreadable: keys not checked)")]
    with on_meta():  # shapes only: nothing allocated
        expected = DualARTransformer(config, 0).state_dict()
    problems = state_dict_problems(state, expected)
    if problems:
        shown = "; ".join(p if len(p) < 300 else p[:300] + "...]" for p in problems[:3])
        return [Finding("error", f"{weights} does not fit config.json: {shown}",
                        "config.json and model.pth must come from the same checkpoint; " + fix)]
    return [Finding("ok", f"{weights}: {len(state)} tensors match config.json")]


def check_base(base_dir: str | os.PathLike) -> list[Finding]:
    """config.json readable, model.pth present, tokenizer holds every required special token."""
    from tokenizers import Tokenizer

    from fish_speech_core.tokenizer import REQUIRED_SPECIAL_TOKENS

    base_dir = Path(base_dir)
    found: list[Finding] = []
    if not base_dir.is_dir():
        return [Finding("error", f"base checkpoint folder {base_dir} does not exist",
                        "pass --base the folder holding config.json, model.pth and tokenizer.json")]
    config = _base_config(base_dir, found)
    weights = base_dir / "model.pth"
    if not weights.is_file():
        found.append(Finding("error", f"{weights} not found",
                             "download the checkpoint again; the folder must hold model.pth"))
    else:
        found += _check_weights(weights, config)
    tok_file = base_dir / "tokenizer.json"
    if not tok_file.is_file():
        found.append(Finding("error", f"{tok_file} not found",
                             "copy tokenizer.json (and its config files) from the released checkpoint"))
        return found
    try:
        tokenizer = Tokenizer.from_file(str(tok_file))
    except Exception as err:  # noqa: BLE001
        found.append(Finding("error", f"{tok_file} is not a tokenizers JSON file: {err}",
                             "copy tokenizer.json from the released checkpoint"))
        return found
    missing = [t for t in REQUIRED_SPECIAL_TOKENS if tokenizer.token_to_id(t) is None]
    if missing:
        found.append(
            Finding("error", f"{tok_file} lacks the special tokens {missing}",
                    "use the tokenizer shipped with fish-speech-1.4 (these tokens mark the prompt "
                    "format and semantic codes; training cannot build a sample without them)")
        )
    else:
        found.append(Finding("ok", f"tokenizer has all {len(REQUIRED_SPECIAL_TOKENS)} special tokens"))
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if config is not None and size > config.vocab_size:
        found.append(
            Finding("error", f"tokenizer has {size} tokens but the model's vocab_size is "
                    f"{config.vocab_size}", "tokenizer and model.pth come from different checkpoints; "
                    "use the tokenizer from the same folder as config.json")
        )
    return found


# ---------------------------------------------------------------- codec


def read_codec_config(codec: str | os.PathLike):
    """The codec's :class:`FireflyConfig` without building the model.

    ``codec`` may be a preset name, a JSON of constructor arguments, or a checkpoint: then the
    config that :func:`save_codec` embeds is read (tensors stay memory-mapped, never copied);
    a checkpoint without one (the released generator .pth) is the ``fish-speech-1.4`` preset.

    Returns:
        (config, note): ``note`` says where the config came from.
    """
    from fish_speech_core.codec.config import PRESETS, FireflyConfig, resolve_config
    from fish_speech_core.files import sha256_file
    from fish_speech_core.hashcache import remembered_json

    text = str(codec)
    if text in PRESETS or text.endswith(".json"):
        return resolve_config(text), f"config {text}"
    path = Path(text)
    if not path.is_file():
        raise FileNotFoundError(f"codec checkpoint {path} not found")
    # Opening the checkpoint imports torch (3-7 s); its sha256 is memoized by the file's stamp, so
    # an unchanged codec's config comes from the memo without either.
    stored = remembered_json("codec-config", sha256_file(path), lambda: _stored_codec_config(path))
    if isinstance(stored, Mapping):
        return FireflyConfig.from_dict(dict(stored)), f"config stored in {path.name}"
    return PRESETS["fish-speech-1.4"], f"{path.name} has no stored config: assumed fish-speech-1.4"


def _stored_codec_config(path: Path) -> dict | None:
    """The constructor arguments :func:`save_codec` embedded in a codec checkpoint (None: none)."""
    from fish_speech_core.codec.checkpoint import CONFIG_KEY
    from fish_speech_core.weights import read_weights

    stored = read_weights(path).get(CONFIG_KEY)  # WeightsError names the file and the reason
    return dict(stored) if isinstance(stored, Mapping) else None


def expected_codebook_size(levels: tuple[int, ...]) -> int:
    """The LM head width that goes with FSQ ``levels``: next power of two >= prod(levels)."""
    return 1 << max(0, math.ceil(math.log2(math.prod(levels))))


def check_compatibility(base_dir: str | os.PathLike, codec_path: str | os.PathLike) -> list[Finding]:
    """Do this base checkpoint and this codec belong together? Errors name both values."""
    base_dir = Path(base_dir)
    found: list[Finding] = []
    config = _base_config(base_dir, found)
    try:
        codec, note = read_codec_config(codec_path)
    except Exception as err:  # noqa: BLE001 - pickles with objects, truncated files, bad JSON
        found.append(
            Finding("error", f"cannot read the codec {codec_path}: {err}",
                    "pass --codec the Firefly generator .pth (firefly-gan-vq-fsq-8x1024-21hz-"
                    "generator.pth), one from `fishtune init-codec`, or a preset name")
        )
        return found
    if config is None:
        return found
    rows = codec.num_codebooks
    levels = tuple(codec.quantizer.levels)
    produced = CodeSpec.from_levels(rows, levels)
    values = produced.codebook_size
    want = expected_codebook_size(levels)
    fix = ("use the base checkpoint and codec from the same Fish Speech release (1.4: "
           "fish-speech-1.4/model.pth with firefly-gan-vq-fsq-8x1024-21hz-generator.pth)")
    problems = fit_problems(produced, config.num_codebooks, config.codebook_size)
    if config.num_codebooks != rows:
        found.append(
            Finding("error", f"base model and codec disagree: {problems[0]} ({base_dir / 'config.json'}); "
                    f"the codec makes {rows} code rows (n_groups {codec.quantizer.n_groups} x n_codebooks {codec.quantizer.n_codebooks}; {note})",
                    fix)
        )
    if config.codebook_size != want:
        too_small = [p for p in problems if p.startswith("codes up to")]
        why = too_small[0] if too_small else "the model was made for a different quantizer"
        found.append(
            Finding("error", f"base model codebook_size is {config.codebook_size} "
                    f"({base_dir / 'config.json'}) but the codec's quantizer levels {list(levels)} "
                    f"give {values} values, which goes with codebook_size {want}; {why} ({note})",
                    fix)
        )
    if not has_errors(found):
        found.append(Finding("ok", f"base and codec match: {rows} codebooks of {values} values "
                             f"in a {config.codebook_size}-way head ({note})"))
    return found


# ---------------------------------------------------------------- storage


def check_storage(url: str) -> list[Finding]:
    """The storage root can be written: a probe object is written, read back and removed."""
    from fish_speech_core import storage
    from fish_speech_core.files import atomic_write

    shown = storage.redact(url)
    try:
        storage.refuse_credentials(url)
    except storage.CredentialsInURLError as err:
        return [Finding("error", f"storage root {shown} carries credentials in the URL",
                        str(err).split("; ", 1)[1])]
    probe = f".fishtune-doctor-{uuid.uuid4().hex}"
    try:
        if storage.is_local(url):
            root = storage.local_path(url)
            root.mkdir(parents=True, exist_ok=True)
            target = root / probe
            with atomic_write(target, "wb") as handle:
                handle.write(b"ok")
            ok = target.read_bytes() == b"ok"
            target.unlink()
        else:
            fs, path = storage.filesystem(storage.join(url, probe))
            fs.pipe_file(path, b"ok")
            ok = fs.cat_file(path) == b"ok"
            fs.rm(path)
    except Exception as err:  # noqa: BLE001 - permission, network, credentials
        return [Finding("error", f"storage root {shown} is not writable: {type(err).__name__}: {storage.redact_text(err)}",
                        "fix the permissions or pick another --storage; for s3:// set "
                        "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (and AWS_ENDPOINT_URL for "
                        "MinIO) and check the bucket exists")]
    if not ok:
        return [Finding("error", f"storage root {shown} returned different bytes than written",
                        "check the storage backend / proxy")]
    return [Finding("ok", f"storage root {shown} is writable")]


def run_checks(base_dir: str | os.PathLike | None = None, codec: str | os.PathLike | None = None,
               storage_url: str | None = None) -> list[Finding]:
    """Everything ``fishtune doctor`` checks, in display order."""
    found = check_environment()
    if base_dir is not None:
        found += check_base(base_dir)
    if base_dir is not None and codec is not None:
        found += [f for f in check_compatibility(base_dir, codec)
                  if not (f.what.startswith(str(Path(base_dir) / "config.json")))]
    elif codec is not None:
        try:
            config, note = read_codec_config(codec)
            found.append(Finding("info", f"codec: {config.num_codebooks} codebooks, levels "
                                 f"{list(config.quantizer.levels)} ({note})"))
        except Exception as err:  # noqa: BLE001
            found.append(Finding("error", f"cannot read the codec {codec}: {err}",
                                 "pass --codec a Firefly generator .pth or a preset name"))
    if storage_url is not None:
        found += check_storage(storage_url)
    return found


def to_json(findings: list[Finding]) -> str:
    return json.dumps([f.__dict__ for f in findings], indent=2)
