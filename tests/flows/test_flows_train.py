"""train + merge in the finetune flow: a failed train fails the flow; the rerun resumes it."""

import json
import shutil
from pathlib import Path

import pytest

from flows.config import FinetuneConfig

DEMO = Path(__file__).parents[2] / "examples" / "demo-data"


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> tuple[Path, Path]:
    from fish_speech_core.codec import init_codec, save_codec
    from fish_speech_core.codec.config import FireflyConfig
    from fish_speech_core.lm.config import PRESETS
    from fish_speech_core.lm.init_base import init_base

    root = tmp_path_factory.mktemp("tiny-models")
    init_base(root / "base", PRESETS["tiny"], seed=0)
    save_codec(init_codec(FireflyConfig.from_name("tiny"), seed=0), root / "codec.pth")
    return root / "base", root / "codec.pth"


@pytest.mark.slow
def test_failed_train_fails_the_flow_and_the_rerun_resumes_it(prefect_env, tmp_path, tiny_models, monkeypatch):
    from fish_speech_core.lm.checkpoint import load_pretrained
    from flows.finetune import finetune
    from tasks.train import FAULT_ENV

    base, codec = tiny_models
    data = tmp_path / "data"
    shutil.copytree(DEMO, data)
    config = FinetuneConfig(data=str(data), storage=str(tmp_path / "store"), project="resume", base=str(base),
                            codec=str(codec), preset="tiny", max_steps=20, progress_every=5)
    monkeypatch.setenv(FAULT_ENV, "10")  # raise once, at the first step past the step-10 checkpoint

    state = finetune(config, return_state=True)
    assert state.is_failed()
    runs = sorted((tmp_path / "store" / "runs").iterdir())
    failed = json.loads((runs[0] / "manifest.json").read_text())
    assert failed["status"] == "failed"
    assert [s["stage"] for s in failed["stages"]] == ["validate", "normalize", "extract", "pack"]

    result = finetune(config)
    stages = {s["stage"]: s for s in result["stages"]}
    assert [s["stage"] for s in result["stages"]] == ["validate", "normalize", "extract", "pack", "train", "merge"]
    assert all(stages[name]["cached"] for name in ("validate", "normalize", "extract", "pack"))
    train = stages["train"]
    assert not train["cached"]
    assert train["summary"]["resumed_from_step"] == 10  # the step counter continued from the checkpoint
    assert train["summary"]["final_step"] == 20
    assert [r["step"] for r in train["summary"]["history"]] == [0, 10, 20]
    recommended = result["recommended_checkpoint"]
    assert recommended and Path(recommended).is_file()
    assert recommended.endswith(f"step_{train['summary']['recommended_step']:09d}.ckpt")

    merged = Path(result["merged_model"])
    assert merged.parent == tmp_path / "store" / "models" / "resume"
    loaded = load_pretrained(merged)
    assert loaded.model.config.dim == 64 and (merged / "lineage.json").is_file()
    report = Path(result["report"]).read_text()
    assert "Recommended checkpoint" in report and Path(recommended).name in report and merged.name in report
    manifest = json.loads(Path(result["manifest"]).read_text())
    assert manifest["status"] == "completed"
    assert {s["stage"]: s for s in manifest["stages"]}["train"]["outputs"]["checkpoint"] == recommended

    again = finetune(config)  # nothing changed: every stage cached, the same model folder, nothing overwritten
    assert all(s["cached"] for s in again["stages"]) and again["merged_model"] == result["merged_model"]
