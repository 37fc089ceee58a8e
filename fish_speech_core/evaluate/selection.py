"""What each speaker's previews say: a real prompt clip and held-out sentences, chosen deterministically.

Per speaker (a folder of audio + transcripts): the prompt is one real clip with its transcript
(a training clip when the trainer's validation split is known), the sentences to render are
transcripts the prompt does not say, preferably the trainer's held-out (validation) sentences,
then other clips' transcripts, and the similarity references are that speaker's other clips.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from fish_speech_core.audio import AUDIO_EXTENSIONS
from fish_speech_core.defaults import TEXT_EXTENSION
from fish_speech_core.files import PathEscapeError, is_temporary, resolve_inside
from fish_speech_core.formats.text import clean_pack_transcript

# Rendered for a speaker with no transcript besides the prompt's (a one-clip speaker): nothing
# of theirs is held out, so a generic sentence still lets the user hear the cloned voice.
FALLBACK_SENTENCES = (
    "This is a short preview of the finetuned voice.",
    "How does it sound to you?",
    "The quick brown fox jumps over the lazy dog.",
)


@dataclass(frozen=True)
class Clip:
    """One real recording of a speaker and its transcript (stripped)."""

    audio: Path
    text: str


@dataclass(frozen=True)
class SpeakerPlan:
    """What to render for one speaker and what to compare it with."""

    speaker: str
    prompt: Clip
    sentences: tuple[str, ...]
    references: tuple[Path, ...]  # real clips for speaker similarity (not the prompt, when others exist)
    source: str  # where the sentences come from, in words
    note: str | None = None  # set when fewer than the asked number of held-out sentences exist

    def as_dict(self) -> dict:
        return {"speaker": self.speaker, "prompt": str(self.prompt.audio), "prompt_text": self.prompt.text,
                "sentences": list(self.sentences), "references": [str(p) for p in self.references],
                "source": self.source, "note": self.note}


def text_key(text: str) -> str:
    """A transcript as the packer stores it, whitespace-insensitive: matches clips to packed sentences."""
    return " ".join(clean_pack_transcript(text).split())


def speaker_clips(root: str | os.PathLike, text_extension: str = TEXT_EXTENSION) -> dict[str, list[Clip]]:
    """Audio files under ``root`` with a non-empty transcript beside them, by speaker folder name, sorted.

    The speaker is the clip's parent folder name, as ``fishtune pack`` names its groups.
    """
    root = Path(root)
    clips: dict[str, list[Clip]] = {}
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() not in AUDIO_EXTENSIONS or path.name.startswith(".") or is_temporary(path):
            continue
        if any(part.startswith(".") for part in path.relative_to(root).parts):
            continue  # hidden state folders are not data
        transcript = path.with_suffix(text_extension)
        try:  # the same root check as every data reader: a link out of the data is not a clip
            resolve_inside(root, path)
            resolve_inside(root, transcript)
        except (PathEscapeError, OSError, RuntimeError):  # RuntimeError: a symlink loop
            continue
        if not path.is_file() or not transcript.is_file():
            continue
        text = transcript.read_text(encoding="utf-8").strip()
        if text:
            clips.setdefault(path.parent.name, []).append(Clip(path, text))
    return dict(sorted(clips.items()))


def held_out_texts(shards: str | os.PathLike | Iterable[str | os.PathLike], val_fraction: float) -> dict[str, set[str]]:
    """The trainer's validation sentences per speaker (as :func:`text_key`), from the packed shards.

    Uses the trainer's own split (``finetune.data.split_groups``: a hash of each sentence's text
    and codes). Empty when nothing is held out, or everything is: the trainer then validates on
    its training sentences, so none of them is held out.
    """
    from fish_speech_core.finetune.data import load_groups, split_groups

    if not 0.0 < val_fraction < 1.0:
        return {}
    groups = load_groups(shards)
    val = split_groups(groups, val_fraction, "val")
    total = sum(len(g.items) for g in groups)
    held = sum(len(g.items) for g in val)
    if held == 0 or held == total:
        return {}
    texts: dict[str, set[str]] = {}
    for group in val:
        for item in group.items:
            texts.setdefault(group.name, set()).update(text_key(t) for t in item.texts)
    return texts


def _unique(texts: Iterable[str], exclude: Collection[str]) -> list[str]:
    seen, out = set(exclude), []
    for text in texts:
        if text_key(text) not in seen:
            seen.add(text_key(text))
            out.append(text)
    return out


def plan_speaker(
    speaker: str,
    clips: Sequence[Clip],
    sentences_per_speaker: int = 3,
    held_out: Collection[str] | None = None,
    max_references: int = 8,
) -> SpeakerPlan:
    """Prompt clip, held-out sentences and reference clips for one speaker (same inputs, same plan).

    ``held_out``: the :func:`text_key` of this speaker's validation sentences, or None when the
    split is unknown. The prompt is the first clip (sorted by path) that is not held out; the
    sentences are the held-out transcripts in clip order, then other clips' transcripts in
    clip order, never the prompt's own text; a speaker with nothing else gets
    :data:`FALLBACK_SENTENCES`.

    Raises:
        ValueError: no clips, or ``sentences_per_speaker`` < 1.
    """
    if not clips:
        raise ValueError(f"speaker {speaker!r} has no clip with a transcript")
    if sentences_per_speaker < 1:
        raise ValueError(f"sentences_per_speaker must be >= 1, got {sentences_per_speaker}")
    clips = sorted(clips, key=lambda c: str(c.audio))
    held = set(held_out or ())
    is_held = [text_key(c.text) in held for c in clips]
    prompt = next((c for c, h in zip(clips, is_held) if not h), clips[0])
    others = [c for c in clips if c is not prompt]
    val_texts = _unique((c.text for c, h in zip(clips, is_held) if h and c is not prompt), {text_key(prompt.text)})
    n = sentences_per_speaker
    sentences = val_texts[:n]
    rest = _unique((c.text for c in others), {text_key(prompt.text), *map(text_key, sentences)})
    sentences += rest[: n - len(sentences)]
    from_val = min(len(val_texts), n)
    note = None
    if not sentences:
        sentences = list(FALLBACK_SENTENCES[:n])
        source = "generic sentences"
        note = f"only the prompt clip has a transcript: {len(sentences)} generic sentence(s) rendered instead"
    else:
        if from_val == len(sentences):
            source = "validation split"
        elif from_val:
            source = f"validation split ({from_val}) + other clips ({len(sentences) - from_val})"
        else:
            source = "other clips" + (" (none of this speaker's clips is in the validation split)" if held_out is not None else "")
        if len(sentences) < n:
            note = f"only {len(sentences)} transcript(s) besides the prompt's: {len(sentences)} of {n} sentences rendered"
    references = tuple(c.audio for c in others[:max_references]) or (prompt.audio,)
    return SpeakerPlan(speaker, prompt, tuple(sentences), references, source, note)


def plan_previews(
    clips: Mapping[str, Sequence[Clip]],
    sentences_per_speaker: int = 3,
    held_out: Mapping[str, Collection[str]] | None = None,
    max_references: int = 8,
) -> list[SpeakerPlan]:
    """:func:`plan_speaker` for every speaker, sorted by name. ``held_out`` None: no known split."""
    return [
        plan_speaker(name, clips[name], sentences_per_speaker,
                     None if held_out is None else held_out.get(name, set()), max_references)
        for name in sorted(clips)
    ]
