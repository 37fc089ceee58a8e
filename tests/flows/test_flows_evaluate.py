"""The evaluate stage end to end on tiny models: per-speaker previews of the base and every checkpoint."""

import json
import re
import shutil
from pathlib import Path

import pytest
import soundfile as sf

from fishtune.flows.config import FinetuneConfig

DEMO = Path(__file__).parents[2] / "examples" / "demo-data"
SPEAKERS = ("alice", "bruno")  # two of the demo's three speakers keep the test short
N = 2  # held-out sentences per speaker (the default is 3; 2 keeps the test short)
TOKENS = 32  # code frames per preview at most (~1.5 s of audio): enough to score a voice


@pytest.fixture(scope="module")
def speaking_models(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny LM that emits codes (so previews have audio to score) and a tiny random codec."""
    from fish_speech_core.codec import init_codec, save_codec
    from fish_speech_core.codec.config import FireflyConfig
    from tests.test_synth_cli import make_speaking_tiny

    root = tmp_path_factory.mktemp("speaking-tiny")
    lm = make_speaking_tiny(root)
    save_codec(init_codec(FireflyConfig.from_name("tiny"), seed=0), root / "codec.pth")
    return lm, root / "codec.pth"


def _mtimes(folder: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*.wav")}


@pytest.mark.slow
def test_evaluate_renders_every_speaker_for_every_checkpoint_scores_them_and_caches(
    prefect_env, tmp_path, speaking_models
):
    from fishtune.flows.finetune import finetune
    from fishtune.tasks.evaluate import evaluate_task
    from fishtune.tasks.params import EvaluateParams

    base, codec = speaking_models
    data = tmp_path / "data"
    for speaker in SPEAKERS:
        shutil.copytree(DEMO / speaker, data / speaker)
    store, work = tmp_path / "store", tmp_path / "work"
    config = FinetuneConfig(data=str(data), storage=str(store), work_dir=str(work), project="voices", base=str(base),
                            codec=str(codec), preset="tiny", max_steps=20, evaluate=True,
                            preview_sentences_per_speaker=N, preview_max_new_tokens=TOKENS)
    result = finetune(config)
    stages = {s["stage"]: s for s in result["stages"]}
    assert list(stages) == ["validate", "normalize", "extract", "pack", "train", "evaluate", "merge"]
    evaluated = stages["evaluate"]
    art = Path(evaluated["url"])
    scores = json.loads((art / "scores.json").read_text())
    summary = scores["summary"]
    models = ["base", "step_000000010", "step_000000020"]
    assert [r["name"] for r in summary["rows"]] == models
    # one set per model and speaker, each rendered and scored once
    assert evaluated["summary"]["rendered"] == evaluated["summary"]["scored"] == len(models) * len(SPEAKERS)

    # N x speakers wavs per model, published under <model>/<speaker>/
    for name in models:
        for speaker in SPEAKERS:
            wavs = sorted((art / name / speaker).glob("*.wav"))
            assert [w.name for w in wavs] == [f"{i:02d}.wav" for i in range(N)]
            for wav in wavs:
                audio, rate = sf.read(wav)
                assert rate == 44100
    # each speaker's prompt is one of its real (normalized) clips, published beside the previews
    normalized = Path(result["normalized"])
    for s in summary["speakers"]:
        prompt = art / s["prompt"]
        assert s["speaker"] in SPEAKERS and prompt.is_file()
        real = normalized / s["speaker"] / prompt.name
        assert real.read_bytes() == prompt.read_bytes()
        assert s["prompt_text"] == real.with_suffix(".lab").read_text().strip()
        assert len(s["sentences"]) == N and s["prompt_text"] not in s["sentences"]
    assert [s["speaker"] for s in summary["speakers"]] == list(SPEAKERS)

    # per model and speaker: numeric scores; per model: the mean over speakers
    for row in summary["rows"]:
        assert [s["speaker"] for s in row["speakers"]] == list(SPEAKERS)
        for s in row["speakers"]:
            assert isinstance(s["similarity"], float) and -1.0 <= s["similarity"] <= 1.0, s
            assert isinstance(s["duration_ratio"], float) and s["duration_ratio"] > 0
            assert len(s["previews"]) == N
        assert row["similarity"] == pytest.approx(sum(s["similarity"] for s in row["speakers"]) / len(SPEAKERS))
    rec = summary["recommended_step"]
    assert rec in (10, 20) and scores["checkpoint"].endswith(f"step_{rec:09d}.ckpt")
    lineage = json.loads((Path(result["merged_model"]) / "lineage.json").read_text())
    assert lineage["adapter"] == scores["checkpoint"] == result["recommended_checkpoint"]  # the pick is merged

    # the report: every checkpoint (means) and every checkpoint x speaker with numbers and audio links
    report = Path(result["report"]).read_text()
    for row in summary["rows"]:
        assert re.search(rf"^\| {row['name']} \| {row['step']} \| [^|]* \| {row['similarity']:.3f} \| "
                         rf"{row['duration_ratio']:.2f} \|", report, re.M)
        for s in row["speakers"]:
            line = next(l for l in report.splitlines() if l.startswith(f"| {row['name']} | {s['speaker']} |"))
            cells = [c.strip() for c in line.strip("|").split("|")]
            assert cells[2] == f"{s['similarity']:.3f}" and cells[3] == f"{s['duration_ratio']:.2f}"
            assert all(f"({art / p})" in cells[5] for p in s["previews"])
    for s in summary["speakers"]:
        assert f"[{Path(s['prompt']).name}]({art / s['prompt']})" in report
    assert f"**Merged checkpoint (previews):** step {rec}" in report

    # content cache: the same inputs published to another store render (and score) nothing again
    previews = work / "evaluate" / "previews"
    before = _mtimes(previews)
    assert len(before) == len(models) * len(SPEAKERS) * N
    args = dict(train_url=stages["train"]["url"], base=str(base), codec=str(codec), normalized_url=result["normalized"],
                store_root=str(tmp_path / "store-2"), work_dir=str(work), pack_url=stages["pack"]["url"],
                params=EvaluateParams(sentences_per_speaker=N, max_new_tokens=TOKENS, seed=config.seed))
    again = evaluate_task.fn(**args)
    assert again["summary"]["rendered"] == 0 and again["summary"]["scored"] == 0 and _mtimes(previews) == before
    strip = lambda rows: [{**r, "speakers": [{k: v for k, v in s.items() if k != "cached"} for s in r["speakers"]]}
                          for r in rows]
    assert all(s["cached"] for r in again["summary"]["rows"] for s in r["speakers"])
    assert strip(again["summary"]["rows"]) == strip(summary["rows"]) and again["checkpoint"] == scores["checkpoint"]

    # an ASR engine configured (asr="pocketsphinx"): the same previews (nothing rendered), scored again once
    # with a word error rate per model and speaker; those scores are cached under their own key
    asr = {"params": args["params"].model_copy(update={"asr": "pocketsphinx"})}
    heard = evaluate_task.fn(**{**args, "store_root": str(tmp_path / "store-asr"), **asr})
    assert heard["summary"]["rendered"] == 0 and heard["summary"]["scored"] == len(models) * len(SPEAKERS)
    for row in heard["summary"]["rows"]:
        assert all(isinstance(s["wer"], float) and s["wer"] >= 0 for s in row["speakers"])
        assert row["wer"] == pytest.approx(sum(s["wer"] for s in row["speakers"]) / len(SPEAKERS))
    reheard = evaluate_task.fn(**{**args, "store_root": str(tmp_path / "store-asr-2"), **asr})
    assert reheard["summary"]["scored"] == 0 and reheard["summary"]["rows"][0]["wer"] == heard["summary"]["rows"][0]["wer"]

    # previews are keyed by model content, not by run: another training artifact that kept the same
    # step-10 checkpoint (and not step 20) evaluates from the cache, base included
    fewer = tmp_path / "train-fewer"
    shutil.copytree(stages["train"]["url"], fewer)
    (fewer / "checkpoints" / "step_000000020.ckpt").unlink()
    partial = evaluate_task.fn(**{**args, "train_url": str(fewer)})
    assert [r["name"] for r in partial["summary"]["rows"]] == ["base", "step_000000010"]
    assert partial["summary"]["rendered"] == 0 and _mtimes(previews) == before

    # the user's merge_step overrides the recommendation; evaluate comes from cache
    other = 10 if rec == 20 else 20
    chosen = finetune(config.model_copy(update={"merge_step": other}))
    chosen_stages = {s["stage"]: s for s in chosen["stages"]}
    assert chosen_stages["evaluate"]["cached"] and _mtimes(previews) == before
    assert chosen["recommended_checkpoint"].endswith(f"step_{other:09d}.ckpt")
    lineage = json.loads((Path(chosen["merged_model"]) / "lineage.json").read_text())
    assert lineage["adapter"] == chosen["recommended_checkpoint"]
    text = Path(chosen["report"]).read_text()
    assert f"**Merged checkpoint (merge_step, your choice):** step {other}" in text
    assert f"**Recommended checkpoint (previews):** step {rec}" in text
