"""The run report's checkpoint section, built directly from a manifest (no flow run)."""

import re

from fish_speech_core.evaluate.plot import plot_checkpoints
from fish_speech_core.storage import RunManifest, StageRecord
from flows.config import FinetuneConfig
from flows.finetune import plot_url, report_markdown


def _rows() -> list[dict]:
    # what tasks.train.evaluate_task returns per model (previews relative to the evaluate artifact)
    def row(name, step, sim, loss, ratio, ok):
        return {"name": name, "step": step, "similarity": sim, "ok_fraction": ok, "duration_ratio": ratio,
                "val_loss": loss, "previews": [f"{name}/00.wav", f"{name}/01.wav"], "problem": None}

    return [row("base", 0, 0.612, None, 1.31, 1.0), row("step_000000010", 10, 0.701, 3.2, 0.97, 1.0),
            row("step_000000020", 20, 0.755, 2.9, 1.12, 0.5)]


def _manifest(store: str) -> tuple[RunManifest, StageRecord]:
    rows = _rows()
    train_url = f"{store}/train/abc"
    train = StageRecord("train", key="abc", url=train_url, outputs={"checkpoint": f"{train_url}/checkpoints/step_000000020.ckpt"},
                        summary={"history": [{"step": 10, "train_loss": 3.5, "val_loss": 3.2},
                                             {"step": 20, "train_loss": 3.0, "val_loss": 2.9}],
                                 "recommended_step": 20, "recommended_note": "earliest within 2% of the best val loss"})
    evaluate = StageRecord("evaluate", key="def", url=f"{store}/evaluate/def",
                           outputs={"checkpoint": f"{train_url}/checkpoints/step_000000020.ckpt"},
                           summary={"rows": rows, "recommended_step": 20, "plot": "plot.png",
                                    "rule": "earliest within 0.02 of the best similarity (0.755)"})
    manifest = RunManifest("run-1", "finetune", {}, status="completed", stages=[train, evaluate])
    return manifest, evaluate


def test_report_shows_each_checkpoint_with_scores_previews_and_plot(tmp_path):
    store = str(tmp_path / "store")
    manifest, evaluate = _manifest(store)
    plot = plot_checkpoints(evaluate.summary["rows"], tmp_path / "store" / "evaluate" / "def" / "plot.png")
    text = report_markdown(FinetuneConfig(data="examples/demo-data", storage=store), manifest)

    assert "| model | step | val loss | similarity | duration | checks ok | previews |" in text
    table = {m.group(1): m.group(0) for m in re.finditer(r"^\| (base|step_\d+) \| .*$", text, re.M)}
    assert set(table) == {"base", "step_000000010", "step_000000020"}
    for r in _rows():
        line = table[r["name"]]
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[1] == str(r["step"])
        assert cells[2] == ("" if r["val_loss"] is None else f"{r['val_loss']:.4f}")
        assert cells[3] == f"{r['similarity']:.3f}"
        assert cells[4] == f"{r['duration_ratio']:.2f}"
        for p in r["previews"]:  # links to the preview files on the store
            assert f"({store}/evaluate/def/{p})" in cells[6]
    assert plot_url(evaluate) == str(plot) and plot.is_file()
    assert f"![held-out loss and similarity vs step]({plot})" in text
    assert "**Merged checkpoint (previews):** step 20" in text
    assert "(earliest within 0.02 of the best similarity (0.755))" in text  # the rule that chose it


def test_report_on_s3_references_redacted_urls():
    manifest, evaluate = _manifest("s3://KEY:SECRET@voices/store")
    text = report_markdown(FinetuneConfig(data="s3://voices/raw", storage="s3://voices/store"), manifest)
    assert "SECRET" not in text and "KEY:" not in text
    assert "![held-out loss and similarity vs step](s3://***@voices/store/evaluate/def/plot.png)" in text
    assert "(s3://***@voices/store/evaluate/def/step_000000010/00.wav)" in text


def test_report_without_a_plot_still_lists_checkpoints(tmp_path):
    # a cached evaluate result from before the plot existed has no "plot" in its summary
    manifest, evaluate = _manifest(str(tmp_path))
    del evaluate.summary["plot"]
    text = report_markdown(FinetuneConfig(data="examples/demo-data", storage=str(tmp_path)), manifest)
    assert "| step_000000020 | 20 | 2.9000 | 0.755 |" in text and "plot.png" not in text
