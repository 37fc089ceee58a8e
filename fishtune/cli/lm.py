"""Base-model commands: init-base (random offline checkpoint), download (real weights)."""

from __future__ import annotations

import time
from enum import Enum
from pathlib import Path

import typer

DEFAULT_REPO = "fishaudio/fish-speech-1.4"
DEFAULT_LOCAL_DIR = Path("checkpoints/fish-speech-1.4")
# What a fish-speech-1.4 folder must hold for fishtune (the VQ-GAN generator is for extraction).
REQUIRED_FILES = (
    "config.json",
    "model.pth",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "firefly-gan-vq-fsq-8x1024-21hz-generator.pth",
)
ETAG_TIMEOUT_S = 10.0  # fail fast on a network that swallows packets


class Preset(str, Enum):
    tiny = "tiny"
    mid = "mid"
    fish_speech_1_4 = "fish-speech-1.4"


def init_base(
    out: Path = typer.Argument(
        ..., help="Folder to write (config.json, model.pth, tokenizer files).", file_okay=False
    ),
    preset: Preset = typer.Option(
        Preset.tiny,
        "--preset",
        help="Model shape: tiny (tests, 1M params), mid (benchmarks, dim 512, 8 layers) or "
        "fish-speech-1.4 (the real 494M-parameter shape).",
    ),
    seed: int = typer.Option(0, "--seed", help="Seed for the random weights; same seed, same weights."),
    tokenizer: Path | None = typer.Option(
        None,
        "--tokenizer",
        help="Folder with tokenizer.json (e.g. a real fish-speech-1.4 folder). Default: build a "
        "small byte-level BPE tokenizer from a built-in English/Spanish corpus.",
        exists=True,
        file_okay=False,
    ),
    force: bool = typer.Option(False, "--force", help="Overwrite files in a non-empty OUT folder."),
) -> None:
    """Write a randomly initialised base checkpoint folder, for offline demos, tests and benchmarks."""
    from fish_speech_core.lm import PRESETS
    from fish_speech_core.lm import init_base as lm_init_base
    from fish_speech_core.tokenizer import FishTokenizer, TokenizerError

    if out.exists() and any(out.iterdir()) and not force:
        raise typer.BadParameter(f"{out} is not empty; pass --force to overwrite", param_hint="OUT")
    fish_tokenizer = None
    if tokenizer is not None:
        from fish_speech_core.files import OverlapError, refuse_overlap

        try:
            refuse_overlap([("--tokenizer", tokenizer)], out, "OUT")
        except OverlapError as err:
            raise typer.BadParameter(str(err), param_hint="OUT") from None
        try:
            fish_tokenizer = FishTokenizer.from_dir(tokenizer)
        except TokenizerError as err:
            raise typer.BadParameter(str(err), param_hint="--tokenizer") from None
    start = time.monotonic()
    with _spinner(f"initialising a {preset.value} model"):
        model = lm_init_base.init_base(out, PRESETS[preset.value], seed, fish_tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    typer.echo(
        f"wrote {out}: preset {preset.value}, {n_params:,} parameters, vocab_size "
        f"{model.config.vocab_size}, seed {seed} ({time.monotonic() - start:.1f} s)"
    )


def download(
    repo: str = typer.Option(DEFAULT_REPO, "--repo", help="Hugging Face model repository to fetch."),
    local_dir: Path = typer.Option(
        DEFAULT_LOCAL_DIR, "--local-dir", help="Folder to download into.", file_okay=False
    ),
    revision: str | None = typer.Option(None, "--revision", help="Branch, tag or commit (default: main)."),
) -> None:
    """Download the real fish-speech-1.4 weights from the Hugging Face Hub."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        path = snapshot_download(
            repo_id=repo, local_dir=local_dir, revision=revision, etag_timeout=ETAG_TIMEOUT_S
        )
    except GatedRepoError:
        _fail(
            f"{repo} is gated: accept its licence on https://huggingface.co/{repo} and log in "
            "with `hf auth login` (or set HF_TOKEN), then run this again."
        )
    except RepositoryNotFoundError:
        _fail(f"{repo} was not found on the Hugging Face Hub (or needs a login); check --repo.")
    except Exception as err:  # noqa: BLE001 - offline, DNS, timeouts, HTTP errors
        _fail(
            f"could not download {repo}: {type(err).__name__}: {str(err).splitlines()[0]}\n"
            f"Without internet access, copy these files from "
            f"https://huggingface.co/{repo} by hand into {local_dir}/:\n"
            + "".join(f"  {name}\n" for name in REQUIRED_FILES)
            + f"then use that folder as the base checkpoint."
        )
    folder = Path(path)
    missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
    typer.echo(f"downloaded {repo} to {folder}")
    if missing:
        _fail(f"{folder} lacks {missing}; is {repo} a fish-speech-1.4 repository?")


def _fail(message: str) -> None:
    typer.echo(f"Error: {message}", err=True)
    raise typer.Exit(code=1)


def _spinner(description: str):
    from fish_speech_core.progress import progress_bar

    progress = progress_bar(transient=True)  # no total: the bar pulses, elapsed time counts
    progress.add_task(description, total=None)
    return progress


def register(app: typer.Typer) -> None:
    app.command("init-base")(init_base)
    app.command("download")(download)
