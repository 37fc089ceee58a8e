"""The finetune run's report (Markdown): data, stages with cache hits, training, previews, the merged model.

Written beside the run manifest and shown in the Prefect UI as a Markdown artifact. A browser
cannot open s3:// or (from the UI) local paths: images and downloads are pre-signed https links
on an s3 store, and plain text naming the file on a local one.
"""

from __future__ import annotations

from pathlib import Path

from fish_speech_core import storage
from fish_speech_core.links import browser_link
from fish_speech_core.storage import RunManifest, StageRecord
from fishtune.flows.config import FinetuneConfig


def plot_url(evaluated: StageRecord) -> str:
    """Where the evaluate stage's loss/similarity plot lives on the store (redacted URL or local path)."""
    return storage.redact(storage.join(evaluated.url, evaluated.summary["plot"]))


# Per-file counters of the stages that keep per-file work (normalize, extract): (redone, reused).
PER_FILE_COUNTS = {"normalize": ("written", "skipped"), "extract": ("extracted", "skipped")}


def cache_label(stage: str, cached: bool, summary: dict) -> str:
    """``hit``; or ``miss``, with what the stage reused when it ran: ``miss (1 of 26 files redone)``
    or ``miss (artifact reused)`` (the same inputs were published before, e.g. by another project)."""
    if cached:
        return "hit"
    if summary.get("reused_artifact"):
        return "miss (artifact reused)"
    redone_key, reused_key = PER_FILE_COUNTS.get(stage, (None, None))
    if redone_key and summary.get(reused_key):
        redone = int(summary.get(redone_key, 0))
        return f"miss ({redone} of {redone + int(summary[reused_key])} files redone)"
    return "miss"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def coverage_section(coverage: dict[str, dict[str, int]]) -> list[str]:
    """Per speaker: sentences seen in training / sentences in the training split."""
    lines = ["| speaker | sentences seen / sentences in the training split |", "|---|---:|"]
    for speaker, row in sorted(coverage.items()):
        share = row["seen"] / row["sentences"] if row["sentences"] else 0.0
        lines.append(f"| {_cell(speaker)} | {row['seen']} / {row['sentences']} ({share:.0%}) |")
    return lines


def preview_section(evaluated: StageRecord, overridden: bool = False) -> list[str]:
    """The report's Previews section: per checkpoint (means over speakers), per checkpoint and speaker
    (scores + audio links), the speakers' prompts and sentences, the plot and the pick (merged unless
    ``overridden`` by the user's merge_step)."""
    e = evaluated.summary
    num = lambda v, f: "" if v is None else format(v, f)
    on_store = lambda p: storage.redact(storage.join(evaluated.url, p))
    link = lambda p: f"[{Path(p).name}]({on_store(p)})"
    # word error rate only when an ASR engine was configured (the asr setting)
    has_wer = any(r.get("wer") is not None for r in e["rows"])
    wer_head, wer_rule = (" word error rate |", "---:|") if has_wer else ("", "")
    wer = lambda row: f" {num(row.get('wer'), '.2f')} |" if has_wer else ""
    lines = ["## Previews", "",
             "Similarity = cosine between a voice embedding of the preview and of the speaker's real clips; "
             "duration = rendered / expected seconds for the text (sane in 0.5–2); checks ok = share of clips "
             "without silence, clipping or duration problems. Per checkpoint: means over the speakers "
             "(what chooses the checkpoint).", "",
             "| model | step | val loss | similarity | duration | checks ok |" + wer_head, "|---|---:|---:|---:|---:|---:|" + wer_rule]
    lines += [f"| {r['name']} | {r['step']} | {num(r.get('val_loss'), '.4f')} | {num(r.get('similarity'), '.3f')} | "
              f"{num(r.get('duration_ratio'), '.2f')} | {num(r.get('ok_fraction'), '.0%')} |" + wer(r) for r in e["rows"]]
    lines += ["", "### Per speaker", "", "| model | speaker | similarity | duration | checks ok |" + wer_head + " previews |",
              "|---|---|---:|---:|---:|" + wer_rule + "---|"]
    for r in e["rows"]:
        # rows cached before per-speaker previews carry no "speakers": one line for the model
        for s in r.get("speakers") or [{**r, "speaker": ""}]:
            lines += [f"| {r['name']} | {_cell(s['speaker'])} | {num(s.get('similarity'), '.3f')} | "
                      f"{num(s.get('duration_ratio'), '.2f')} | {num(s.get('ok_fraction'), '.0%')} |" + wer(s) + " "
                      + (", ".join(link(p) for p in s["previews"]) or "none")
                      + (f" ({_cell(s['problem'])})" if s.get("problem") else "") + " |"]
    if e.get("speakers"):
        lines += ["", "| speaker | prompt clip | held-out sentences | from |", "|---|---|---|---|"]
        lines += [f"| {_cell(s['speaker'])} | [{Path(s['prompt']).name}]({on_store(s['prompt'])}) "
                  f"\"{_cell(s['prompt_text'])}\" | " + " / ".join(f"\"{_cell(t)}\"" for t in s["sentences"])
                  + f" | {_cell(s['source'])}" + (f" — {_cell(s['note'])}" if s.get("note") else "") + " |"
                  for s in e["speakers"]]
    if e.get("plot"):
        plot = plot_url(evaluated)
        image = browser_link(storage.join(evaluated.url, e["plot"]))
        if image:  # an image the UI can fetch; a local file would be a broken image there
            lines += ["", f"![held-out loss and similarity vs step]({image})"]
        lines += ["", f"Plot: `{plot}`"]
    lines += ["", f"**{'Recommended' if overridden else 'Merged'} checkpoint (previews):** step {e['recommended_step']} — "
              f"`{storage.redact(evaluated.outputs.get('checkpoint', ''))}` ({e['rule']})"]
    return lines


def report_markdown(config: FinetuneConfig, manifest: RunManifest) -> str:
    """The run report: data summary, rejects by reason, per-stage wall time and cache hit/miss."""
    lines = [f"# fishtune finetune `{config.project}` — run `{manifest.run_id}`", ""]
    lines += [f"- data: `{storage.redact(config.data)}`" + (f" (speaker `{config.speaker}`)" if config.speaker else "")]
    lines += [f"- storage: `{storage.redact(config.storage)}`", f"- status: **{manifest.status}**", ""]
    validation = next((s for s in manifest.stages if s.stage == "validate"), None)
    if validation:
        s = validation.summary
        lines += ["## Data", "", f"{s['accepted']} accepted, {s['rejected']} rejected, {s['total_hours'] * 60:.2f} min of audio", ""]
        lines += ["| speaker | accepted | rejected | hours |", "|---|---:|---:|---:|"]
        lines += [f"| {name} | {row['accepted']} | {row['rejected']} | {row['hours']:.4f} |" for name, row in s["speakers"].items()]
        if s["rejects_by_reason"]:
            lines += ["", "| reject reason | files |", "|---|---:|"]
            lines += [f"| {reason} | {n} |" for reason, n in s["rejects_by_reason"].items()]
        lines += [f"\n> {note}" for note in s["advice"]]
        lines += [""]
    lines += ["## Stages", "", "| stage | cache | wall s | artifact |", "|---|---|---:|---|"]
    lines += [
        f"| {s.stage} | {cache_label(s.stage, s.cached, s.summary)} | {s.seconds:.2f} | `{storage.redact(s.url)}` |" for s in manifest.stages
    ]
    trained = next((s for s in manifest.stages if s.stage == "train"), None)
    if trained:
        t = trained.summary
        lines += ["", "## Training", ""]
        if t.get("resumed_from_step"):
            lines += [f"Resumed from the checkpoint at step {t['resumed_from_step']}.", ""]
        lines += ["| step | train loss | val loss |", "|---:|---:|---:|"]
        fmt = lambda v: "" if v is None else f"{v:.4f}"
        lines += [f"| {r['step']} | {fmt(r.get('train_loss'))} | {fmt(r.get('val_loss'))} |" for r in t.get("history", [])]
        if t.get("coverage"):
            lines += ["", *coverage_section(t["coverage"])]
        checkpoint = trained.outputs.get("checkpoint")
        lines += ["", f"**Recommended checkpoint:** step {t.get('recommended_step')} — `{storage.redact(checkpoint or '')}`"
                  + (f" ({t['recommended_note']})" if t.get("recommended_note") else "")]
    evaluated = next((s for s in manifest.stages if s.stage == "evaluate"), None)
    if evaluated:
        lines += ["", *preview_section(evaluated, overridden=config.merge_step is not None)]
    merged = next((s for s in manifest.stages if s.stage == "merge"), None)
    if merged and config.merge_step is not None:
        lines += ["", f"**Merged checkpoint (merge_step, your choice):** step {config.merge_step} — "
                  f"`{storage.redact(merged.inputs.get('checkpoint', ''))}`"]
    if merged:
        lines += ["", f"**Merged model:** `{storage.redact(merged.url)}` (version `{merged.summary.get('version')}`)"]
    return "\n".join(lines) + "\n"
