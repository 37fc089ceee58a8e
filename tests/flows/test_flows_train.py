"""train + merge in the finetune flow: a failed train fails the flow; the rerun resumes it."""

import json
import shutil
import time
from pathlib import Path

import pytest

from fishtune.flows.config import FinetuneConfig

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
    from fishtune.flows.finetune import finetune
    from fishtune.tasks import train as train_tasks

    base, codec = tiny_models
    data = tmp_path / "data"
    shutil.copytree(DEMO, data)
    config = FinetuneConfig(data=str(data), storage=str(tmp_path / "store"), project="resume", base=str(base),
                            codec=str(codec), preset="tiny", max_steps=20, progress_every=5)
    # raise once, at the first progress report past the step-10 checkpoint (the fault comes from the
    # test: production code has no hook for it)
    original_report = train_tasks.ProgressReport.__call__
    faults = []

    def failing_once(self, info):
        original_report(self, info)
        if info["step"] > 10 and not faults:
            faults.append(info["step"])
            raise RuntimeError(f"injected training fault at step {info['step']}")

    monkeypatch.setattr(train_tasks.ProgressReport, "__call__", failing_once)

    started = time.perf_counter()
    state = finetune(config, return_state=True)
    failed_seconds = time.perf_counter() - started
    assert state.is_failed()
    runs = sorted((tmp_path / "store" / "runs").iterdir())
    failed = json.loads((runs[0] / "manifest.json").read_text())
    assert failed["status"] == "failed"
    assert [s["stage"] for s in failed["stages"]] == ["validate", "normalize", "extract", "pack"]

    started = time.perf_counter()
    result = finetune(config)
    resumed_seconds = time.perf_counter() - started
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
    # coverage of the whole run (the resumed half included): every speaker, sentences seen / in the split
    coverage = train["summary"]["coverage"]
    assert set(coverage) == {"alice", "bruno", "carmen"}
    assert all(0 < row["seen"] <= row["sentences"] for row in coverage.values())
    assert "sentences seen / sentences in the training split" in report
    manifest = json.loads(Path(result["manifest"]).read_text())
    assert manifest["status"] == "completed"
    assert {s["stage"]: s for s in manifest["stages"]}["train"]["outputs"]["checkpoint"] == recommended

    started = time.perf_counter()
    again = finetune(config)  # nothing changed: every stage cached, the same model folder, nothing overwritten
    cached_seconds = time.perf_counter() - started
    assert [s["stage"] for s in again["stages"]] == ["validate", "normalize", "extract", "pack", "train", "merge"]
    assert all(s["cached"] for s in again["stages"]) and again["merged_model"] == result["merged_model"]

    # Cache speed-up: the failed run and its resumed rerun together did the whole flow's work once (data
    # stages, 20 train steps (+1 redone after the fault), merge); the rerun with nothing changed is all Cached.
    # Compared on the flow runs' own run times as the server recorded them (what the UI shows): the caller's
    # wall clock adds a constant ~0.5-1 s of Prefect teardown per sync flow (heartbeat join, result and log
    # flush), which is no work of ours, so it is checked separately with a looser bound.
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        ran = lambda run_id: client.read_flow_run(run_id).total_run_time.total_seconds()
        first = ran(state.state_details.flow_run_id) + ran(result["run_id"])
        rerun = ran(again["run_id"])
    print(f"flow run time: first {first:.2f} s, all cached {rerun:.2f} s ({first / rerun:.0f}x); caller wall: "
          f"failed {failed_seconds:.2f} s + resumed {resumed_seconds:.2f} s, all cached {cached_seconds:.2f} s")
    # The all-cached run is Prefect's fixed per-run cost (~0.5-1 s of task-run bookkeeping for 6 cached
    # stages), the first runs are this tiny model's real work (~7 s on quiet cores now that training and
    # model loading got faster): a ratio alone would fail as our own stages speed up, so both bounds.
    assert first >= 5 * rerun and rerun < 2.5, (first, rerun)
    assert failed_seconds + resumed_seconds >= 5 * cached_seconds, (failed_seconds, resumed_seconds, cached_seconds)

    # Re-finetune with warm_start: data stages from cache, training starts from the latest merged LoRA of the
    # project, and the result is a new model version beside the previous one (never overwritten).
    warm = finetune(config.model_copy(update={"warm_start": True, "max_steps": 10}))
    warm_stages = {s["stage"]: s for s in warm["stages"]}
    assert all(warm_stages[name]["cached"] for name in ("validate", "normalize", "extract", "pack"))
    assert not warm_stages["train"]["cached"] and not warm_stages["merge"]["cached"]
    versions = sorted(p.name for p in (tmp_path / "store" / "models" / "resume").iterdir() if not p.name.startswith("."))
    assert len(versions) == 2 and Path(warm["merged_model"]).name in versions and merged.name in versions
    assert load_pretrained(merged).model.config.dim == 64  # the previous version is intact
    first_lineage = json.loads((merged / "lineage.json").read_text())
    assert Path(first_lineage["adapter"]).name == Path(recommended).name
    warm_manifest = json.loads(Path(warm["manifest"]).read_text())
    assert Path(warm_manifest["inputs"]["init_lora"]).name == Path(recommended).name  # lineage names the start



def test_warm_start_refuses_another_base(tmp_path, tiny_models):
    import json as _json

    from fish_speech_core import storage
    from fish_speech_core.storage import Store
    from fish_speech_core.registry import WarmStartError, latest_lora

    base, _ = tiny_models
    store = Store(str(tmp_path / "store"))
    with pytest.raises(WarmStartError, match="no earlier merged model"):
        latest_lora(store, "voice", str(base))
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    (model_dir / "lineage.json").write_text(_json.dumps({"adapter": "/x/step_000000010.ckpt", "base_sha256": "0" * 64}))
    store.publish("models/voice", "20260101T000000-aaaa", model_dir)
    with pytest.raises(WarmStartError, match="trained on base model.pth sha256 000000000000"):
        latest_lora(store, "voice", str(base))
    good = storage.hash_url(str(base / "model.pth"))
    (model_dir / "lineage.json").write_text(_json.dumps({"adapter": "/y/step_000000020.ckpt", "base_sha256": good}))
    store.publish("models/voice", "20260102T000000-bbbb", model_dir)
    assert latest_lora(store, "voice", str(base)) == "/y/step_000000020.ckpt"  # the newest version


def test_a_base_and_codec_that_do_not_belong_together_fail_before_any_stage(prefect_env, tmp_path, tiny_models):
    from fishtune.flows.finetune import finetune

    base, codec = tiny_models
    mismatched = tmp_path / "base-2048"
    shutil.copytree(base, mismatched)
    config_json = json.loads((mismatched / "config.json").read_text())
    config_json["codebook_size"] = 2048  # a head for another codec generation (the 1.2/1.4 mix-up)
    (mismatched / "config.json").write_text(json.dumps(config_json))
    config = FinetuneConfig(data=str(DEMO), storage=str(tmp_path / "store"), project="mixup", base=str(mismatched),
                            codec=str(codec), preset="tiny", max_steps=2)
    state = finetune(config, return_state=True)
    assert state.is_failed()
    with pytest.raises(ValueError, match="do not belong together") as error:
        state.result()
    assert "2048" in str(error.value) and "1024" in str(error.value)
    manifest = json.loads(next((tmp_path / "store" / "runs").iterdir()).joinpath("manifest.json").read_text())
    assert manifest["status"] == "failed" and manifest["stages"] == []  # nothing heavy ran


def test_layout_is_run_only_and_the_launcher_gives_each_node_its_rendezvous():
    """devices / num_nodes / strategy / backend / rendezvous leave the stage key alone (the layout
    trains the same adapters); the pool launcher starts one train child run per node, each with
    the env job variables the core reads and its own GPUs."""
    from fishtune.flows.gpu import train_job_variables, train_launches
    from fishtune.tasks.params import TrainParams
    from fishtune.tasks.remote import _merged, job_variables_for

    layout = dict(devices="0,1", num_nodes=2, strategy="ddp", process_group_backend="nccl", master_addr="10.0.0.5",
                  master_port=29600)
    assert TrainParams(**layout).key_fields() == TrainParams().key_fields()
    assert TrainParams(seed=1).key_fields() != TrainParams().key_fields()
    runs = train_launches({"params": TrainParams(**layout).model_dump(mode="json")})
    assert [overrides["node_rank"] for overrides, _ in runs] == [0, 1]
    assert all(overrides["params"]["devices"] == "2" for overrides, _ in runs)  # the child sees only its two GPUs
    assert [variables for _, variables in runs] == [
        {"env": {"NODE_RANK": str(rank), "MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "29600", "WORLD_SIZE": "4"}}
        for rank in (0, 1)]
    # what the launcher sends each node: the pool sizing (2 GPUs per node) plus its rendezvous
    overrides, variables = runs[1]
    sized = _merged(job_variables_for(TrainParams.model_validate(overrides["params"])), variables)
    assert sized == {"gpu_count": 2, "env": variables["env"]}
    assert train_launches({"params": TrainParams().model_dump(mode="json")}) == [({}, None)]  # one node, auto: as before
    assert train_job_variables(TrainParams(devices="4")) == {}  # one node: the pool's sizing alone
    assert job_variables_for(TrainParams(devices="0,1,2")) == {"gpu_count": 3}

    with pytest.raises(ValueError, match="num_nodes 2 needs gpu_pool"):
        FinetuneConfig(data="/d", num_nodes=2, devices="1", master_addr="h")
    with pytest.raises(ValueError, match="num_nodes 2 needs master_addr"):
        FinetuneConfig(data="/d", num_nodes=2, devices="1", gpu_pool="cuda")
    with pytest.raises(ValueError, match="needs devices as a count"):
        FinetuneConfig(data="/d", num_nodes=2, master_addr="h", gpu_pool="cuda")
    config = FinetuneConfig(data="/d", gpu_pool="cuda", **layout)
    assert config.train_params() == TrainParams(**layout)
