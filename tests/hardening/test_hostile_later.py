"""Hostile inputs to the later stages: codes that do not fit, silent NaNs, damaged model files.

Real inputs throughout: audio from the factory and the reference clips, the reference tiny
checkpoints, shards written by our own protos writer, ``.npy`` files with lying headers.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from numpy.lib import format as npy_format
from typer.testing import CliRunner

from fish_speech_core.codec import load_codec, save_codec
from fish_speech_core.codec.extract import ExtractSettings, extract, sidecar_path_for
from fish_speech_core.codes import CodeSpec, array_problem, fit_problems
from fish_speech_core.doctor import check_base, has_errors
from fish_speech_core.finetune.lora import LoraError, read_adapter
from fish_speech_core.finetune.limits import TrainError
from fish_speech_core.finetune.shards import check_data_fits_base
from fish_speech_core.formats.protos import ProtoStreamError, frame_record, iter_text_data
from fish_speech_core.formats.text_data_pb2 import Semantics, Sentence, TextData
from fish_speech_core.lm import ConfigError, DualARConfig
from fish_speech_core.pack import pack
from fish_speech_core.tokenizer import FishTokenizer, TokenizerError
from fishtune.cli import app
from tests.audio_factory import tree_digest, voiced, write_clip

runner = CliRunner()


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def codec(reference):
    firefly = reference / "firefly"
    return load_codec(firefly / "small-model.pth", firefly / "small-config.json")


def _one_line_error(result, *needles):
    """No traceback, and one line of the output says it all (every needle on it)."""
    text = result.output
    assert "Traceback" not in text, text
    assert any(all(n in line for n in needles) for line in text.splitlines()), (needles, text)


# ------------------------------------------------------------------ the shared rule


def test_rule_names_rows_values_dtype_and_shape():
    spec = CodeSpec(8, 1000)
    assert array_problem(np.zeros((8, 3), np.int32), spec) is None
    assert "4 codebook rows" in array_problem(np.zeros((4, 3), np.int32), spec)
    assert "code value 1000 is outside [0, 1000)" in array_problem(np.full((8, 3), 1000), spec)
    assert "code value -1" in array_problem(np.full((8, 3), -1), spec)
    assert "dtype float32" in array_problem(np.zeros((8, 3), np.float32), spec)
    assert "shape (8, 0)" in array_problem(np.zeros((8, 0), np.int64), spec)
    assert fit_problems(CodeSpec(8, 1000), 8, 1024) == []
    assert fit_problems(CodeSpec(8, 1000), 8, 512) == [
        "codes up to 999 (stored as code + 1 = 1000) would index past the base model's codebook_size 512"]
    # the +1 storage offset: 1023 is the largest code of a 1024-way codec but does not fit a 1024-way head
    assert "stored as code + 1 = 1024" in fit_problems(CodeSpec(8, 1024), 8, 1024)[0]
    assert fit_problems(CodeSpec(8, 1023), 8, 1024) == []
    assert "num_codebooks is 4" in fit_problems(CodeSpec(8, 1000), 4, 1024)[0]


# ------------------------------------------------------------------ extract


def test_extract_records_the_codec_spec_and_refuses_nan_audio(codec, tmp_path):
    good = write_clip(tmp_path / "spk" / "good.wav", seconds=1.0)
    nan = voiced(1.0, 16000, seed=1)
    nan[100:200] = np.nan
    bad = tmp_path / "spk" / "nan.wav"
    soundfile.write(bad, nan, 16000, subtype="FLOAT")
    inf = tmp_path / "spk" / "inf.wav"
    soundfile.write(inf, np.where(np.arange(16000) == 5, np.inf, voiced(1.0, 16000, seed=2)), 16000, subtype="FLOAT")
    summary = extract(codec, [good, bad, inf], ExtractSettings(num_workers=0))
    status = {r.audio_path.name: (r.status, r.reason) for r in summary.results}
    assert status["good.wav"][0] == "extracted"
    assert status["nan.wav"] == ("failed", "audio holds NaN or infinite samples")
    assert status["inf.wav"] == ("failed", "audio holds NaN or infinite samples")
    record = json.loads(sidecar_path_for(good.with_suffix(".npy")).read_text())
    assert (record["num_codebooks"], record["codebook_size"]) == (8, 1000)
    assert not sidecar_path_for(bad.with_suffix(".npy")).exists() and not bad.with_suffix(".npy").exists()


def _nan_codec(reference, path, part: str):
    """The small reference codec with NaN in the first tensor of ``part`` (backbone / head)."""
    firefly = reference / "firefly"
    model = load_codec(firefly / "small-model.pth", firefly / "small-config.json")
    with torch.no_grad():
        next(getattr(model, part).parameters()).fill_(float("nan"))
    save_codec(model, path)
    return path


def test_extract_cli_refuses_a_codec_with_nan_weights_once(reference, tmp_path):
    _nan_codec(reference, tmp_path / "nan-codec.pth", "backbone")
    data = tmp_path / "data"
    for i in range(2):
        write_clip(data / "spk" / f"{i}.wav", seconds=1.0, seed=i)
    before = tree_digest(data)
    result = cli("extract", data, "--checkpoint-path", tmp_path / "nan-codec.pth", "--num-workers", "0")
    assert result.exit_code == 2
    _one_line_error(result, "nan-codec.pth", "not finite")
    assert result.output.count("not finite") == 1
    assert tree_digest(data) == before  # no codes, no sidecars


def test_encoder_nan_output_fails_only_that_file(codec, tmp_path, monkeypatch):
    """A non-finite encoder output (as bf16 overflow would give) fails the file, not the batch."""
    clips = [write_clip(tmp_path / f"{i}.wav", seconds=1.0, seed=i) for i in range(3)]
    backbone = codec.backbone
    original = backbone.forward

    def poisoned(mels):  # item 1 of a batch of 3 turns to NaN, as a real overflow would
        out = original(mels)
        if out.shape[0] == 3:
            out = out.clone()
            out[1] = float("nan")
        return out

    monkeypatch.setattr(backbone, "forward", poisoned)
    summary = extract(codec, clips, ExtractSettings(num_workers=0, batch_size=3, bucket=False))
    status = {r.audio_path.name: r.status for r in summary.results}
    assert status == {"0.wav": "extracted", "1.wav": "failed", "2.wav": "extracted"}
    assert not sidecar_path_for(clips[1].with_suffix(".npy")).exists()


# ------------------------------------------------------------------ pack


def _item(folder: Path, name: str, codes: np.ndarray, spec: CodeSpec | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.lab").write_text(f"sentence {name}", encoding="utf-8")
    np.save(folder / f"{name}.npy", codes)
    if spec is not None:
        sidecar_path_for(folder / f"{name}.npy").write_text(
            json.dumps({"num_codebooks": spec.num_codebooks, "codebook_size": spec.codebook_size}))


def test_pack_rejects_codes_that_do_not_fit_their_codec_and_packs_the_rest(tmp_path):
    data = tmp_path / "data" / "spk"
    ok = np.arange(8 * 5).reshape(8, 5) % 1000
    _item(data, "ok", ok, CodeSpec(8, 1000))
    _item(data, "ok-no-sidecar", np.full((8, 4), 1023))  # what the reference packer accepts
    _item(data, "too-big", np.full((8, 4), 1000), CodeSpec(8, 1000))  # the codec cannot make 1000
    _item(data, "too-big-no-sidecar", np.full((8, 4), 1024))
    _item(data, "rows", np.zeros((4, 4), np.int64), CodeSpec(8, 1000))
    _item(data, "negative", np.full((8, 4), -3))
    (data / "huge.lab").write_text("huge")
    with open(data / "huge.npy", "wb") as handle:
        npy_format.write_array_header_1_0(handle, {"descr": "<i8", "fortran_order": False, "shape": (8, 10**12)})
        handle.write(b"\0" * 64)
    before = tree_digest(tmp_path / "data")
    summary = pack([tmp_path / "data"], tmp_path / "out")
    reasons = {Path(r.item).stem: r.reason for r in summary.rejects}
    assert set(reasons) == {"too-big", "too-big-no-sidecar", "rows", "negative", "huge"}
    assert reasons["too-big"].startswith("bad codes too-big.npy: code value 1000 is outside [0, 1000)")
    assert "code value 1024 is outside [0, 1024)" in reasons["too-big-no-sidecar"]
    assert "4 codebook rows" in reasons["rows"] and "rows.npy" in reasons["rows"]
    assert "code value -3" in reasons["negative"]
    assert "huge.npy" in reasons["huge"] and "header claims shape (8, 1000000000000)" in reasons["huge"]
    assert summary.sentences == 2
    assert tree_digest(tmp_path / "data") == before


# ------------------------------------------------------------------ shards vs base (train)


def _shard(path: Path, sentences: list[tuple[list[str], list[list[int]]]], name: str = "spk") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    record = TextData(source="folder", name=name, sentences=[
        Sentence(texts=texts, semantics=[Semantics(values=row) for row in rows]) for texts, rows in sentences])
    path.write_bytes(frame_record(record.SerializeToString()))
    return path


@pytest.mark.parametrize("rows, problem", [
    ([[1, 2, 3]] * 4, "codes have 4 codebook rows but the base model's num_codebooks is 8"),
    ([[1, 2, 3]] * 7 + [[1, 2, 1023]],
     "codes up to 1023 (stored as code + 1 = 1024) would index past the base model's codebook_size 1024"),
])
def test_train_refuses_shards_that_do_not_fit_the_base_before_building_it(reference, tmp_path, rows, problem):
    good = _shard(tmp_path / "data" / "00000000.protos", [(["fine"], [[1, 2, 3]] * 8)])
    bad = _shard(tmp_path / "data" / "00000001.protos", [(["fine"], [[1, 2, 3]] * 8), (["bad"], rows)], "eve")
    with pytest.raises(TrainError) as err:
        check_data_fits_base(reference / "tiny-llama", [tmp_path / "data"])
    message = str(err.value)
    assert str(bad) in message and "speaker 'eve' sentence 1" in message and problem in message
    assert str(good) not in message


def test_train_cli_refuses_bad_shards_in_one_line(reference, tmp_path):
    _shard(tmp_path / "data" / "00000000.protos", [(["hi"], [[5, 6]] * 8), (["x"], [[5, 2000]] * 8)])
    result = cli("train", "--project", "p", "--base", reference / "tiny-llama", "--data", tmp_path / "data",
                 "--results-dir", tmp_path / "results", "--max-steps", "1", "--max-length", "256")
    assert result.exit_code == 1
    _one_line_error(result, "00000000.protos", "codes up to 2000 (stored as code + 1 = 2001) would index past")
    assert not (tmp_path / "results" / "p" / "checkpoints").exists()


@pytest.mark.parametrize("sentence, problem", [
    (([], [[1, 2]] * 8), "has no text"),
    ((["   "], [[1, 2]] * 8), "has no text"),
    ((["text"], []), "has no semantic codes"),
    ((["text"], [[]] * 8), "has no semantic codes"),
    ((["text"], [[1, 2]] * 7 + [[1]]), "codebook rows have different lengths [1, 2]"),
])
def test_readers_refuse_sentences_without_text_or_codes(tmp_path, sentence, problem):
    shard = _shard(tmp_path / "s.protos", [(["ok"], [[1]] * 8), sentence])
    with pytest.raises(ProtoStreamError) as err:
        list(iter_text_data(shard))
    assert str(shard) in str(err.value) and "sentence 1" in str(err.value) and problem in str(err.value)


# ------------------------------------------------------------------ base config and tokenizer


@pytest.mark.parametrize("change, needle", [
    ({"dim": "64"}, "dim must be a positive integer, got '64'"),
    ({"n_head": 0}, "n_head must be a positive integer, got 0"),
    ({"max_seq_len": 4}, "max_seq_len 4 is too small"),
    ({"norm_eps": -1}, "norm_eps must be a number > 0"),
    ({"codebook_size": None}, "codebook_size must be a positive integer, got None"),
    ({"tie_word_embeddings": "no"}, "tie_word_embeddings must be true or false"),
])
def test_base_config_types_and_ranges_are_checked_naming_file_and_field(reference, tmp_path, change, needle):
    base = tmp_path / "base"
    shutil.copytree(reference / "tiny-llama", base)
    config = json.loads((base / "config.json").read_text()) | change
    (base / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError) as err:
        DualARConfig.from_file(base / "config.json")
    assert str(base / "config.json") in str(err.value) and needle in str(err.value)
    assert any(needle in f.what for f in check_base(base) if f.level == "error")


@pytest.mark.parametrize("content", [b"{}", b"garbage \xff", b"[1, 2]", b""])
def test_unreadable_tokenizer_is_named(reference, tmp_path, content):
    base = tmp_path / "base"
    shutil.copytree(reference / "tiny-llama", base)
    (base / "tokenizer.json").write_bytes(content)
    with pytest.raises(TokenizerError) as err:
        FishTokenizer.from_dir(base)
    assert str(base / "tokenizer.json") in str(err.value)
    result = cli("synthesize", "--model", base, "--codec", reference / "firefly" / "small-model.pth",
                 "--codec-config", reference / "firefly" / "small-config.json", "--text", "hi", "-o", tmp_path / "x.wav")
    assert result.exit_code == 2
    _one_line_error(result, "tokenizer.json")


def _without_semantic(reference, tmp_path) -> Path:
    base = tmp_path / "base"
    shutil.copytree(reference / "tiny-llama", base)
    tok = json.loads((base / "tokenizer.json").read_text())
    tok["added_tokens"] = [t for t in tok["added_tokens"] if t["content"] != "<|semantic|>"]
    tok["model"]["vocab"]["<|semantic_gone|>"] = tok["model"]["vocab"].pop("<|semantic|>")
    (base / "tokenizer.json").write_text(json.dumps(tok))
    return base


def test_merge_with_a_tokenizer_lacking_semantic_fails_in_one_line(reference, tmp_path):
    base = _without_semantic(reference, tmp_path)
    result = cli("merge", "--base-weight", base, "--lora-weight", reference / "lora" / "lora-ckpt.ckpt",
                 "--output", tmp_path / "out")
    assert result.exit_code == 1
    _one_line_error(result, "<|semantic|>", "tokenizer.json")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ LoRA metadata and merge


@pytest.mark.parametrize("metadata, needle", [
    ("not json {", "is not valid JSON"),
    ("[1, 2]", "must be a JSON object"),
    ('{"r": "8", "alpha": 16, "dropout": 0.01}', "r must be an integer"),
    ('{"r": 0, "alpha": 16, "dropout": 0.01}', "r must be >= 1"),
    ('{"r": 8, "alpha": 16}', "missing field 'dropout'"),
    ('{"r": 8, "alpha": 16, "dropout": 0.01, "evil": 1}', "unknown fields ['evil']"),
])
def test_bad_lora_json_is_refused_naming_it(reference, tmp_path, metadata, needle):
    ckpt = tmp_path / "lora-ckpt.ckpt"
    shutil.copy(reference / "lora" / "lora-ckpt.ckpt", ckpt)
    (tmp_path / "lora.json").write_text(metadata)
    with pytest.raises(LoraError) as err:
        read_adapter(ckpt)
    assert str(tmp_path / "lora.json") in str(err.value) and needle in str(err.value)
    result = cli("merge", "--base-weight", reference / "tiny-llama", "--lora-weight", ckpt, "--output", tmp_path / "out")
    assert result.exit_code == 1 and not (tmp_path / "out").exists()
    _one_line_error(result, "lora.json")


def test_merge_of_a_nan_adapter_fails_and_writes_nothing(reference, tmp_path):
    data = torch.load(reference / "lora" / "lora-ckpt.ckpt", weights_only=True)
    key = next(k for k in data["state_dict"] if k.endswith("lora_B"))
    data["state_dict"][key] = torch.full_like(data["state_dict"][key], float("nan"))
    ckpt = tmp_path / "nan.ckpt"
    torch.save(data, ckpt)
    out = tmp_path / "merged"
    result = cli("merge", "--base-weight", reference / "tiny-llama", "--lora-weight", ckpt, "--output", out)
    assert result.exit_code == 1
    _one_line_error(result, "nan.ckpt", "NaN or Inf")
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["nan.ckpt"]


def test_merge_refuses_nan_in_the_merged_tensors(reference, tmp_path):
    """A finite adapter on a base with a NaN weight: the merged tensor is NaN, the merge fails."""
    base = tmp_path / "base"
    shutil.copytree(reference / "tiny-llama", base)
    state = torch.load(base / "model.pth", weights_only=True)
    key = next(k for k in state if k.endswith("attention.wqkv.weight"))
    state[key] = state[key].clone()
    state[key][0, 0] = float("nan")
    torch.save(state, base / "model.pth")
    result = cli("merge", "--base-weight", base, "--lora-weight", reference / "lora" / "lora-ckpt.ckpt",
                 "--output", tmp_path / "out")
    assert result.exit_code == 1
    _one_line_error(result, "not finite")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ decode and synthesize


def _decode(reference, codes_file, out):
    firefly = reference / "firefly"
    return cli("decode", codes_file, "--checkpoint-path", firefly / "small-model.pth",
               "--config", firefly / "small-config.json", "-o", out)


@pytest.mark.parametrize("kind, needle", [
    ("huge-header", "header claims shape (8, 1000000000000)"),
    ("empty", "empty file (0 bytes)"),
    ("garbage", "not an .npy file"),
    ("pickle", "not a readable .npy array"),
    ("rows", "4 codebook rows"),
    ("values", "values in [0, 1000)"),
])
def test_decode_refuses_bad_npy_in_one_line(reference, tmp_path, kind, needle):
    path = tmp_path / f"{kind}.npy"
    if kind == "huge-header":
        with open(path, "wb") as handle:
            npy_format.write_array_header_1_0(handle, {"descr": "<i4", "fortran_order": False, "shape": (8, 10**12)})
            handle.write(b"\0" * 32)
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "garbage":
        path.write_bytes(b"\x00garbage" * 10)
    elif kind == "pickle":
        np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    elif kind == "rows":
        np.save(path, np.zeros((4, 5), np.int32))
    else:
        np.save(path, np.full((8, 5), 1000, np.int32))
    result = _decode(reference, path, tmp_path / "x.wav")
    assert result.exit_code == 2 and "Aborted" not in result.output
    _one_line_error(result, path.name, needle)
    assert not (tmp_path / "x.wav").exists()


@pytest.mark.parametrize("kind, needle", [
    ("text", "not readable audio"), ("empty", "empty file (0 bytes)"), ("nan", "NaN or infinite samples"),
])
def test_synthesize_refuses_a_bad_prompt_audio(reference, tmp_path, kind, needle):
    prompt = tmp_path / f"{kind}.wav"
    if kind == "text":
        prompt.write_text("this is not audio at all\n" * 20)
    elif kind == "empty":
        prompt.write_bytes(b"")
    else:
        audio = voiced(1.0, 44100)
        audio[10] = np.nan
        soundfile.write(prompt, audio, 44100, subtype="FLOAT")
    firefly = reference / "firefly"
    result = cli("synthesize", "--model", reference / "tiny-llama", "--codec", firefly / "small-model.pth",
                 "--codec-config", firefly / "small-config.json", "--text", "hello", "-o", tmp_path / "x.wav",
                 "--prompt-audio", prompt, "--prompt-text", "hi", "--device", "cpu")
    assert result.exit_code == 2
    _one_line_error(result, prompt.name, needle)
    assert not (tmp_path / "x.wav").exists()


# ------------------------------------------------------------------ doctor reads model.pth


@pytest.mark.parametrize("kind, needle", [
    ("truncated", "could not read"), ("garbage", "could not read"), ("pickle", "refusing to load"),
    ("wrong-keys", "does not fit config.json"), ("empty-dict", "holds no tensors"),
])
def test_doctor_reports_a_damaged_model_pth_as_an_error(reference, tmp_path, kind, needle):
    base = tmp_path / "base"
    shutil.copytree(reference / "tiny-llama", base)
    weights = base / "model.pth"
    if kind == "truncated":
        weights.write_bytes(weights.read_bytes()[:5000])
    elif kind == "garbage":
        weights.write_bytes(b"\x80garbage" * 100)
    elif kind == "pickle":
        torch.save({"x": Path("/etc")}, weights)  # a pickled object, not a tensor
    elif kind == "wrong-keys":
        torch.save({"not.a.key": torch.zeros(2)}, weights)
    else:
        torch.save({}, weights)
    findings = check_base(base)
    assert has_errors(findings)
    assert any(f.level == "error" and str(weights) in f.what and needle in f.what for f in findings), findings
    result = cli("doctor", "--base", base)
    assert result.exit_code == 1 and "Traceback" not in result.output


def test_doctor_accepts_the_reference_model_pth(reference):
    findings = check_base(reference / "tiny-llama")
    assert not has_errors(findings)
    assert any(f.level == "ok" and "tensors match config.json" in f.what for f in findings)


def test_decode_with_a_nan_decoder_writes_nothing(reference, tmp_path):
    _nan_codec(reference, tmp_path / "nan-head.pth", "head")
    codes = tmp_path / "codes.npy"
    np.save(codes, np.full((8, 6), 3, np.int32))
    result = cli("decode", codes, "--checkpoint-path", tmp_path / "nan-head.pth", "-o", tmp_path / "x.wav")
    assert result.exit_code == 2
    _one_line_error(result, "nan-head.pth", "NaN or infinite samples")
    assert not (tmp_path / "x.wav").exists()


def test_a_rerun_adds_the_spec_to_older_sidecars_without_re_encoding(codec, tmp_path):
    clip = write_clip(tmp_path / "spk" / "a.wav", seconds=1.0)
    extract(codec, [clip], ExtractSettings(num_workers=0))
    sidecar = sidecar_path_for(clip.with_suffix(".npy"))
    old = {k: v for k, v in json.loads(sidecar.read_text()).items() if k not in ("num_codebooks", "codebook_size")}
    sidecar.write_text(json.dumps(old))
    npy = clip.with_suffix(".npy").read_bytes()
    summary = extract(codec, [clip], ExtractSettings(num_workers=0))
    assert [r.status for r in summary.results] == ["skipped"]
    assert json.loads(sidecar.read_text()) == old | {"num_codebooks": 8, "codebook_size": 1000}
    assert clip.with_suffix(".npy").read_bytes() == npy
