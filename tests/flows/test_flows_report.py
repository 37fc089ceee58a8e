"""The run report's checkpoint section, built directly from a manifest (no flow run)."""

import re

from fish_speech_core.evaluate.plot import plot_checkpoints
from fish_speech_core.storage import RunManifest, StageRecord
from fishtune.flows.config import FinetuneConfig
from fishtune.flows.report import plot_url, report_markdown


SPEAKERS = ("alice", "bruno")


def _rows() -> list[dict]:
    # what tasks.train.evaluate_task returns per model (previews relative to the evaluate artifact)
    def row(name, step, sims, loss, ratios, oks):
        speakers = [{"speaker": spk, "similarity": sim, "duration_ratio": ratio, "ok_fraction": ok, "wer": None,
                     "problem": None, "previews": [f"{name}/{spk}/00.wav", f"{name}/{spk}/01.wav"], "cached": False}
                    for spk, sim, ratio, ok in zip(SPEAKERS, sims, ratios, oks)]
        return {"name": name, "step": step, "similarity": sum(sims) / 2, "ok_fraction": sum(oks) / 2,
                "duration_ratio": sum(ratios) / 2, "wer": None, "val_loss": loss,
                "previews": [p for s in speakers for p in s["previews"]], "problem": None, "speakers": speakers}

    return [row("base", 0, (0.612, 0.580), None, (1.31, 1.2), (1.0, 1.0)),
            row("step_000000010", 10, (0.701, 0.690), 3.2, (0.97, 1.01), (1.0, 1.0)),
            row("step_000000020", 20, (0.755, 0.74), 2.9, (1.12, 1.3), (0.5, 1.0))]


def _speakers() -> list[dict]:
    return [{"speaker": spk, "prompt": f"prompts/{spk}/{spk}_000.wav", "prompt_text": f"I am {spk}.",
             "sentences": ["One | two.", "Three."], "source": "validation split", "note": None, "references": 8}
            for spk in SPEAKERS]


def _manifest(store: str) -> tuple[RunManifest, StageRecord]:
    rows = _rows()
    train_url = f"{store}/train/abc"
    train = StageRecord("train", key="abc", url=train_url, outputs={"checkpoint": f"{train_url}/checkpoints/step_000000020.ckpt"},
                        summary={"history": [{"step": 10, "train_loss": 3.5, "val_loss": 3.2},
                                             {"step": 20, "train_loss": 3.0, "val_loss": 2.9}],
                                 "recommended_step": 20, "recommended_note": "earliest within 2% of the best val loss"})
    evaluate = StageRecord("evaluate", key="def", url=f"{store}/evaluate/def",
                           outputs={"checkpoint": f"{train_url}/checkpoints/step_000000020.ckpt"},
                           summary={"rows": rows, "speakers": _speakers(), "recommended_step": 20, "plot": "plot.png",
                                    "rule": "earliest within 0.02 of the best similarity (0.755)"})
    manifest = RunManifest("run-1", "finetune", {}, status="completed", stages=[train, evaluate])
    return manifest, evaluate


def test_report_shows_each_checkpoint_with_scores_previews_and_plot(tmp_path):
    store = str(tmp_path / "store")
    manifest, evaluate = _manifest(store)
    plot = plot_checkpoints(evaluate.summary["rows"], tmp_path / "store" / "evaluate" / "def" / "plot.png")
    text = report_markdown(FinetuneConfig(data="examples/demo-data", storage=store), manifest)

    assert "| model | step | val loss | similarity | duration | checks ok |" in text
    table = {m.group(1): m.group(0) for m in re.finditer(r"^\| (base|step_\d+) \| \d+ \| .*$", text, re.M)}
    assert set(table) == {"base", "step_000000010", "step_000000020"}
    for r in _rows():  # per checkpoint: the means over speakers
        cells = [c.strip() for c in table[r["name"]].strip("|").split("|")]
        assert cells[1] == str(r["step"])
        assert cells[2] == ("" if r["val_loss"] is None else f"{r['val_loss']:.4f}")
        assert cells[3] == f"{r['similarity']:.3f}"
        assert cells[4] == f"{r['duration_ratio']:.2f}"
        assert cells[5] == f"{r['ok_fraction']:.0%}"
    assert "| model | speaker | similarity | duration | checks ok | previews |" in text
    per_speaker = {(m.group(1), m.group(2)): m.group(0)
                   for m in re.finditer(r"^\| (base|step_\d+) \| (alice|bruno) \| .*$", text, re.M)}
    assert len(per_speaker) == 3 * len(SPEAKERS)
    for r in _rows():  # per checkpoint and speaker: scores and links to its preview files on the store
        for s in r["speakers"]:
            cells = [c.strip() for c in per_speaker[r["name"], s["speaker"]].strip("|").split("|")]
            assert cells[2:5] == [f"{s['similarity']:.3f}", f"{s['duration_ratio']:.2f}", f"{s['ok_fraction']:.0%}"]
            for p in s["previews"]:
                assert f"[{p.rsplit('/', 1)[1]}]({store}/evaluate/def/{p})" in cells[5]
    for spk in _speakers():  # each speaker's prompt clip (linked), its words and the held-out sentences
        line = next(l for l in text.splitlines() if l.startswith(f"| {spk['speaker']} | [{spk['speaker']}_000.wav]"))
        assert f"({store}/evaluate/def/{spk['prompt']})" in line and f'"{spk["prompt_text"]}"' in line
        assert '"One \\| two." / "Three."' in line and "validation split" in line  # a pipe in a sentence is escaped
    assert plot_url(evaluate) == str(plot) and plot.is_file()
    # a local file: named as text, never a broken image in the UI
    assert f"Plot: `{plot}`" in text and "![" not in text
    assert "**Merged checkpoint (previews):** step 20" in text
    assert "(earliest within 0.02 of the best similarity (0.755))" in text  # the rule that chose it


def test_report_on_s3_references_redacted_urls():
    manifest, evaluate = _manifest("s3://KEY:SECRET@voices/store")
    text = report_markdown(FinetuneConfig(data="s3://voices/raw", storage="s3://voices/store"), manifest)
    assert "SECRET" not in text and "KEY:" not in text
    assert "Plot: `s3://***@voices/store/evaluate/def/plot.png`" in text
    assert "(s3://***@voices/store/evaluate/def/step_000000010/alice/00.wav)" in text


def test_report_without_a_plot_still_lists_checkpoints(tmp_path):
    # a cached evaluate result from before the plot existed has no "plot" in its summary
    manifest, evaluate = _manifest(str(tmp_path))
    del evaluate.summary["plot"]
    text = report_markdown(FinetuneConfig(data="examples/demo-data", storage=str(tmp_path)), manifest)
    assert "| step_000000020 | 20 | 2.9000 | 0.748 |" in text and "plot.png" not in text


def test_report_of_rows_cached_before_per_speaker_previews(tmp_path):
    # an evaluate result cached by an earlier version: rows without "speakers", no speaker plans
    manifest, evaluate = _manifest(str(tmp_path))
    for r in evaluate.summary["rows"]:
        del r["speakers"]
    del evaluate.summary["speakers"]
    text = report_markdown(FinetuneConfig(data="examples/demo-data", storage=str(tmp_path)), manifest)
    assert f"| step_000000010 |  | 0.696 | 0.99 | 100% | [00.wav]({tmp_path}/evaluate/def/step_000000010/alice/00.wav)" in text


def test_report_adds_word_error_rate_only_when_an_asr_engine_scored(tmp_path):
    manifest, evaluate = _manifest(str(tmp_path))
    rows = evaluate.summary["rows"]
    for i, r in enumerate(rows):
        r["wer"] = 0.5 - 0.1 * i
        for s in r["speakers"]:
            s["wer"] = r["wer"]
    text = report_markdown(FinetuneConfig(data="examples/demo-data", storage=str(tmp_path)), manifest)
    assert "| model | step | val loss | similarity | duration | checks ok | word error rate |" in text
    assert "| step_000000020 | 20 | 2.9000 | 0.748 | 1.21 | 75% | 0.30 |" in text
    assert "| model | speaker | similarity | duration | checks ok | word error rate | previews |" in text
    line = next(l for l in text.splitlines() if l.startswith("| base | alice |"))
    assert "| 0.50 | [00.wav]" in line
    plain, _ = _manifest(str(tmp_path))
    assert "word error rate" not in report_markdown(FinetuneConfig(data="examples/demo-data", storage=str(tmp_path)), plain)
