"""Later-stage cases: codes that do not fit, silent NaNs, damaged shards, configs, adapters, npys.

Inputs are the reference tiny checkpoints (tiny-llama, the small Firefly codec, the reference
LoRA checkpoint) copied into the case's folder and damaged there, real audio from the factory,
shards written with our protos writer, and ``.npy`` files with lying headers.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import soundfile

from tests.audio_factory import voiced, write_clip
from tests.hardening.corpus import Case, Run

REFERENCE = Path(__file__).resolve().parents[2] / "fixtures" / "reference"
FIREFLY = REFERENCE / "firefly"
CODEC_ARGS = ["--checkpoint-path", str(FIREFLY / "small-model.pth"), "--config", str(FIREFLY / "small-config.json")]


def _copy_base(tmp: Path) -> Path:
    base = tmp / "base"
    shutil.copytree(REFERENCE / "tiny-llama", base)
    return base


def _huge_header_npy(path: Path) -> Path:
    from numpy.lib import format as npy_format

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        npy_format.write_array_header_1_0(handle, {"descr": "<i4", "fortran_order": False, "shape": (8, 10**12)})
        handle.write(b"\0" * 32)
    return path


def _shard(path: Path, sentences: list[tuple[list[str], list[list[int]]]]) -> Path:
    from fish_speech_core.formats.protos import frame_record
    from fish_speech_core.formats.text_data_pb2 import Semantics, Sentence, TextData

    path.parent.mkdir(parents=True, exist_ok=True)
    record = TextData(source="folder", name="spk", sentences=[
        Sentence(texts=texts, semantics=[Semantics(values=row) for row in rows]) for texts, rows in sentences])
    path.write_bytes(frame_record(record.SerializeToString()))
    return path


def _packed_sentences(out: Path) -> int:
    from fish_speech_core.formats.protos import iter_text_data

    return sum(len(r.sentences) for r in iter_text_data(out)) if any(out.glob("*.protos")) else 0


# ------------------------------------------------------------------ pack


def _pack_case(bad_codes: np.ndarray | None, sidecar: dict | None, huge: bool = False):
    def build(tmp: Path) -> Run:
        data = tmp / "data" / "spk"
        data.mkdir(parents=True)
        (data / "good.lab").write_text("a good sentence")
        np.save(data / "good.npy", np.arange(40).reshape(8, 5))
        (data / "bad.lab").write_text("a bad sentence")
        if huge:
            _huge_header_npy(data / "bad.npy")
        else:
            np.save(data / "bad.npy", bad_codes)
        if sidecar is not None:
            (data / "bad.npy.json").write_text(json.dumps(sidecar))
        out = tmp / "out"

        def check(done) -> str | None:  # the bad item must not be packed
            return "silent-accept" if _packed_sentences(out) != 1 else None

        return Run(["pack", "-i", str(tmp / "data"), "-o", str(out)], exit_codes=(0,),
                   output_has=("bad.npy",), unchanged=(tmp / "data",), check=check)
    return build


def _with(build, *needles):
    def wrapped(tmp: Path) -> Run:
        run = build(tmp)
        run.output_has = (*run.output_has, *needles)
        return run
    return wrapped


# ------------------------------------------------------------------ extract


def _extract_nan_audio(tmp: Path) -> Run:
    data = tmp / "data"
    write_clip(data / "spk" / "good.wav", seconds=1.0, sample_rate=44100)
    audio = voiced(1.0, 44100, seed=2)
    audio[500:600] = np.nan
    soundfile.write(data / "spk" / "nan.wav", audio, 44100, subtype="FLOAT")
    (data / "spk" / "nan.lab").write_text("not a number")

    def check(done) -> str | None:
        return "silent-accept" if (data / "spk" / "nan.npy.json").exists() else None

    return Run(["extract", str(data), *CODEC_ARGS, "--num-workers", "0"], exit_codes=(0,),
               output_has=("nan.wav", "NaN or infinite"), check=check)


def _extract_nan_codec(tmp: Path) -> Run:
    import torch

    from fish_speech_core.codec import load_codec, save_codec

    model = load_codec(FIREFLY / "small-model.pth", FIREFLY / "small-config.json")
    with torch.no_grad():
        next(model.backbone.parameters()).fill_(float("nan"))
    save_codec(model, tmp / "nan-codec.pth")
    data = tmp / "data"
    write_clip(data / "spk" / "a.wav", seconds=1.0, sample_rate=44100)

    def check(done) -> str | None:
        return "silent-accept" if (data / "spk" / "a.npy").exists() else None

    return Run(["extract", str(data), "--checkpoint-path", str(tmp / "nan-codec.pth"), "--num-workers", "0"],
               exit_codes=(2,), output_has=("nan-codec.pth", "not finite"), unchanged=(data,), check=check)


# ------------------------------------------------------------------ train


def _train_case(sentences, *needles, base_change: dict | None = None):
    def build(tmp: Path) -> Run:
        base = _copy_base(tmp)
        if base_change:
            config = json.loads((base / "config.json").read_text()) | base_change
            (base / "config.json").write_text(json.dumps(config))
        _shard(tmp / "shards" / "00000000.protos", sentences)
        return Run(["train", "--project", "p", "--base", str(base), "--data", str(tmp / "shards"),
                    "--results-dir", str(tmp / "results"), "--max-steps", "1", "--max-length", "256"],
                   exit_codes=(1,), output_has=needles, unchanged=(base, tmp / "shards"))
    return build


GOOD_SENTENCE = (["hello"], [[1, 2, 3]] * 8)


# ------------------------------------------------------------------ merge


def _merge_nan_adapter(tmp: Path) -> Run:
    import torch

    data = torch.load(REFERENCE / "lora" / "lora-ckpt.ckpt", weights_only=True)
    key = next(k for k in data["state_dict"] if k.endswith("lora_B"))
    data["state_dict"][key] = torch.full_like(data["state_dict"][key], float("nan"))
    torch.save(data, tmp / "nan.ckpt")
    out = tmp / "merged"

    def check(done) -> str | None:
        return "silent-accept" if out.exists() else None

    return Run(["merge", "--base-weight", str(REFERENCE / "tiny-llama"), "--lora-weight", str(tmp / "nan.ckpt"),
                "--output", str(out)], output_has=("nan.ckpt", "NaN or Inf"), check=check)


def _merge_bad_lora_json(tmp: Path) -> Run:
    shutil.copy(REFERENCE / "lora" / "lora-ckpt.ckpt", tmp / "lora-ckpt.ckpt")
    (tmp / "lora.json").write_text('{"r": "eight", "alpha": 16, "dropout": 0.01}')
    return Run(["merge", "--base-weight", str(REFERENCE / "tiny-llama"), "--lora-weight", str(tmp / "lora-ckpt.ckpt"),
                "--output", str(tmp / "merged")], output_has=("lora.json", "r must be an integer"))


def _merge_tokenizer_without_semantic(tmp: Path) -> Run:
    base = _copy_base(tmp)
    tok = json.loads((base / "tokenizer.json").read_text())
    tok["added_tokens"] = [t for t in tok["added_tokens"] if t["content"] != "<|semantic|>"]
    tok["model"]["vocab"]["<|semantic_x|>"] = tok["model"]["vocab"].pop("<|semantic|>")
    (base / "tokenizer.json").write_text(json.dumps(tok))
    return Run(["merge", "--base-weight", str(base), "--lora-weight", str(REFERENCE / "lora" / "lora-ckpt.ckpt"),
                "--output", str(tmp / "merged")], output_has=("<|semantic|>", "tokenizer.json"), unchanged=(base,))


# ------------------------------------------------------------------ decode, synthesize, doctor


def _decode_case(make, *needles):
    def build(tmp: Path) -> Run:
        codes = make(tmp / "codes.npy")
        return Run(["decode", str(codes), *CODEC_ARGS, "-o", str(tmp / "x.wav")], exit_codes=(2,),
                   output_has=("codes.npy", *needles), output_lacks=("Aborted",))
    return build


def _synthesize_nan_prompt(tmp: Path) -> Run:
    audio = voiced(1.0, 44100)
    audio[10] = np.inf
    soundfile.write(tmp / "prompt.wav", audio, 44100, subtype="FLOAT")
    return Run(["synthesize", "--model", str(REFERENCE / "tiny-llama"), "--codec", str(FIREFLY / "small-model.pth"),
                "--codec-config", str(FIREFLY / "small-config.json"), "--text", "hello", "-o", str(tmp / "x.wav"),
                "--prompt-audio", str(tmp / "prompt.wav"), "--prompt-text", "hi", "--device", "cpu"],
               exit_codes=(2,), output_has=("prompt.wav", "NaN or infinite"))


def _doctor_truncated_model(tmp: Path) -> Run:
    base = _copy_base(tmp)
    weights = base / "model.pth"
    weights.write_bytes(weights.read_bytes()[:4096])
    # The findings table wraps long paths, so the needles are the words that start the finding.
    return Run(["doctor", "--base", str(base)], output_has=("ERROR", "could not read"), unchanged=(base,))


CASES = [
    Case("later", "pack-code-past-codec-size", _with(_pack_case(np.full((8, 4), 1000), {
        "num_codebooks": 8, "codebook_size": 1000}), "outside [0, 1000)")),
    Case("later", "pack-wrong-codebook-rows", _with(_pack_case(np.zeros((4, 4), np.int64), None), "4 codebook rows")),
    Case("later", "pack-npy-header-claims-huge-shape", _with(_pack_case(None, None, huge=True), "header claims shape")),
    Case("later", "extract-nan-audio", _extract_nan_audio),
    Case("later", "extract-codec-with-nan-weights", _extract_nan_codec),
    Case("later", "train-shard-codes-past-base-codebook", _train_case(
        [GOOD_SENTENCE, (["x"], [[1, 2, 1500]] * 8)], "00000000.protos", "would index past")),
    Case("later", "train-shard-wrong-rows", _train_case(
        [GOOD_SENTENCE, (["x"], [[1, 2, 3]] * 4)], "00000000.protos", "num_codebooks is 8")),
    Case("later", "train-shard-sentence-without-text", _train_case(
        [GOOD_SENTENCE, ([], [[1, 2, 3]] * 8)], "00000000.protos", "has no text")),
    Case("later", "train-base-config-string-dim", _train_case(
        [GOOD_SENTENCE], "config.json", "dim must be a positive integer", base_change={"dim": "64"})),
    Case("later", "merge-nan-adapter", _merge_nan_adapter),
    Case("later", "merge-bad-lora-json", _merge_bad_lora_json),
    Case("later", "merge-tokenizer-without-semantic", _merge_tokenizer_without_semantic),
    Case("later", "decode-npy-header-claims-huge-shape", _decode_case(_huge_header_npy, "header claims shape")),
    Case("later", "decode-empty-npy", _decode_case(lambda p: (p.write_bytes(b""), p)[1], "empty file")),
    Case("later", "synthesize-prompt-audio-inf", _synthesize_nan_prompt),
    Case("later", "doctor-truncated-model-pth", _doctor_truncated_model),
]
