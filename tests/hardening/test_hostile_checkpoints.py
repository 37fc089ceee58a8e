"""Hostile checkpoints for the codec and LoRA readers (the LM's are in tests/lm/test_lm_checkpoint.py).

Each pickle would create a marker file if unpickled normally; the marker must never appear.
"""

import pickle

import pytest
import torch

from fish_speech_core.codec import CodecCheckpointError, load_codec
from fish_speech_core.finetune.lora import LoraError, read_adapter
from fish_speech_core.weights import WeightsError
from tests.finetune.helpers_train import run_cli
from tests.hardening.hostile import _Touch, write_marker_pickle


def test_the_hostile_file_really_runs_code_when_unpickled(tmp_path):
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Touch(probe)))
    assert probe.exists()  # so "the marker is absent" below means "refused", not "harmless file"


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("zip_format", [True, False], ids=["torch.save", "raw pickle"])
def test_codec_pickle_with_code_is_refused(tmp_path, zip_format):
    marker = tmp_path / "marker"
    path = write_marker_pickle(tmp_path / "codec.pth", marker, zip_format)
    with pytest.raises(WeightsError, match="refusing to load .*objects other than tensors"):
        load_codec(path, "tiny")
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_extract_cli_refuses_a_hostile_codec(tmp_path):
    marker = tmp_path / "marker"
    path = write_marker_pickle(tmp_path / "codec.pth", marker)
    import numpy as np
    import soundfile as sf

    (tmp_path / "data" / "SPK").mkdir(parents=True)
    sf.write(tmp_path / "data" / "SPK" / "a.wav", np.zeros(44100, np.float32), 44100)
    (tmp_path / "data" / "SPK" / "a.lab").write_text("hello")
    result = run_cli("extract", tmp_path / "data", "--checkpoint-path", path, "--preset", "tiny")
    assert result.exit_code != 0
    assert "refusing to load" in result.output and "Traceback" not in result.output
    assert not marker.exists()
    assert sorted(p.name for p in (tmp_path / "data" / "SPK").iterdir()) == ["a.lab", "a.wav"]


def test_codec_non_tensor_entries_are_refused(tmp_path, reference):
    state = torch.load(reference / "firefly" / "small-model.pth", weights_only=True)
    state["backbone.norm.bias"] = [1.0, 2.0]  # a list: allowed by weights_only, not a weight
    torch.save(state, tmp_path / "codec.pth")
    with pytest.raises(CodecCheckpointError, match=r"backbone\.norm\.bias.* are not tensors"):
        load_codec(tmp_path / "codec.pth", "tiny")


def test_codec_integer_weights_are_refused_naming_the_key(tmp_path, reference):
    state = torch.load(reference / "firefly" / "small-model.pth", weights_only=True)
    key = "backbone.norm.bias"
    state[key] = torch.zeros_like(state[key], dtype=torch.int64)
    torch.save(state, tmp_path / "codec.pth")
    with pytest.raises(CodecCheckpointError, match=r"dtype mismatches: backbone\.norm\.bias: checkpoint dtype torch\.int64"):
        load_codec(tmp_path / "codec.pth", "tiny")


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("zip_format", [True, False], ids=["torch.save", "raw pickle"])
def test_lora_pickle_with_code_is_refused(tmp_path, zip_format):
    marker = tmp_path / "marker"
    path = write_marker_pickle(tmp_path / "lora.ckpt", marker, zip_format)
    with pytest.raises(WeightsError, match="refusing to load .*objects other than tensors"):
        read_adapter(path)
    assert not marker.exists()


def test_merge_cli_refuses_a_hostile_adapter(tmp_path, reference):
    marker = tmp_path / "marker"
    path = write_marker_pickle(tmp_path / "lora.ckpt", marker)
    out = tmp_path / "merged"
    result = run_cli("merge", "--base-weight", reference / "tiny-llama", "--lora-weight", path, "--output", out)
    assert result.exit_code == 1
    assert "refusing to load" in result.output and "Traceback" not in result.output
    assert not marker.exists()
    assert not out.exists()


def _reference_adapter(reference):
    return torch.load(reference / "lora" / "lora-ckpt.ckpt", weights_only=True)


def test_lora_non_tensor_entry_is_refused_naming_the_key(tmp_path, reference):
    data = _reference_adapter(reference)
    key = next(k for k in data["state_dict"] if "lora_A" in k)
    data["state_dict"][key] = {"not": "a tensor"}
    torch.save(data, tmp_path / "lora.ckpt")
    with pytest.raises(LoraError, match=f"LoRA entries \\['{key}'\\] are not tensors"):
        read_adapter(tmp_path / "lora.ckpt")


@pytest.mark.parametrize("fault", ["shape", "dtype"])
def test_lora_shape_or_dtype_mismatch_names_the_key(tmp_path, reference, fault):
    data = _reference_adapter(reference)
    key = next(k for k in data["state_dict"] if "lora_B" in k)
    tensor = data["state_dict"][key]
    if fault == "shape":
        data["state_dict"][key] = torch.zeros(tensor.shape[0] + 1, tensor.shape[1])
    else:
        data["state_dict"][key] = torch.zeros(tensor.shape, dtype=torch.int32)
    torch.save(data, tmp_path / "lora.ckpt")
    out = tmp_path / "merged"
    result = run_cli("merge", "--base-weight", reference / "tiny-llama", "--lora-weight",
                     tmp_path / "lora.ckpt", "--output", out)
    assert result.exit_code == 1
    name = key.removeprefix("model.")
    assert name in result.output
    assert ("has shape" if fault == "shape" else "has dtype torch.int32") in result.output
    assert not out.exists()
