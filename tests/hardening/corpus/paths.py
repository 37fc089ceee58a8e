"""Path and storage cases: symlinks out of the root, outputs inside inputs, credentials in URLs."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow.parquet as pq

from tests.audio_factory import write_clip
from tests.hardening.corpus import Case, Run


def _speaker_link_out_of_root(tmp: Path) -> Run:
    data, outside = tmp / "data", tmp / "outside"
    write_clip(data / "anna" / "a.wav")
    write_clip(outside / "secret.wav", seed=3)
    os.symlink(outside, data / "eve")
    report = tmp / "manifest.parquet"

    def check(done) -> str | None:
        rows = {r["path"]: (r["status"], r["reason"]) for r in pq.read_table(report).to_pylist()}
        if any(status == "accepted" and not path.startswith("anna/") for path, (status, _) in rows.items()):
            return "escape"
        return None

    return Run(["validate", str(data), "--report", str(report)], exit_codes=(0,), output_has=("path-escapes-root",),
               unchanged=(data, outside), check=check)


CASES = [
    Case("paths", "validate-speaker-symlink-out-of-root", _speaker_link_out_of_root),
]


# ---------------------------------------------------------------- round two (issue 12)

SECRET = "wJalrXUtnFEMI/K7MDENG+bPxRfiCY"
KEY = "AKIAIOSFODNN7EXAMPLE"
OUTSIDE_TEXT = "outside-the-root-secret-transcript"


def _codes(path: Path, frames: int = 6) -> None:
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, (np.arange(8 * frames, dtype=np.int64).reshape(8, frames)) % 1024)


def _pack_dataset(tmp: Path) -> tuple[Path, Path]:
    data, outside = tmp / "data", tmp / "outside"
    (data / "spk").mkdir(parents=True)
    (data / "spk" / "good.lab").write_text("a good line")
    _codes(data / "spk" / "good.npy")
    outside.mkdir()
    (outside / "secret.lab").write_text(OUTSIDE_TEXT)
    _codes(outside / "secret.npy", frames=9)
    return data, outside


def _shards_leak(shards: Path, needle: bytes):
    def check(done) -> str | None:
        if any(needle in p.read_bytes() for p in shards.glob("*.protos")):
            return "escape"
        if not list(shards.glob("*.protos")):
            return "unclear"  # the good item must still be packed
        return None

    return check


def _pack_lab_link_out(tmp: Path) -> Run:
    data, outside = _pack_dataset(tmp)
    (data / "spk" / "x.lab").symlink_to(outside / "secret.lab")
    _codes(data / "spk" / "x.npy")
    return Run(["pack", "-i", str(data), "-o", str(tmp / "shards")], exit_codes=(0,),
               output_has=("x.lab", "path-escapes-root"), unchanged=(data, outside),
               check=_shards_leak(tmp / "shards", OUTSIDE_TEXT.encode()))


def _pack_npy_link_out(tmp: Path) -> Run:
    data, outside = _pack_dataset(tmp)
    (data / "spk" / "x.lab").write_text("codes from elsewhere")
    (data / "spk" / "x.npy").symlink_to(outside / "secret.npy")
    return Run(["pack", "-i", str(data), "-o", str(tmp / "shards")], exit_codes=(0,),
               output_has=("x.lab", "path-escapes-root"), unchanged=(data, outside),
               check=_shards_leak(tmp / "shards", b"codes from elsewhere"))


def _pack_lab_link_to_etc(tmp: Path) -> Run:
    data, outside = _pack_dataset(tmp)
    (data / "spk" / "host.lab").symlink_to("/etc/hostname")
    _codes(data / "spk" / "host.npy")
    hostname = Path("/etc/hostname").read_bytes().strip() if Path("/etc/hostname").is_file() else b"\0none"
    return Run(["pack", "-i", str(data), "-o", str(tmp / "shards")], exit_codes=(0,),
               output_has=("host.lab", "path-escapes-root"), unchanged=(data,),
               check=_shards_leak(tmp / "shards", hostname or b"\0none"))


def _pack_output_is_input(tmp: Path) -> Run:
    data, _ = _pack_dataset(tmp)
    (data / "00000003.protos").write_bytes(b"a user's own file named like a shard")
    return Run(["pack", "-i", str(data), "-o", str(data)], exit_codes=(1,),
               output_has=(str(data), "inputs are never modified"), unchanged=(data,))


def _pack_output_inside_input(tmp: Path) -> Run:
    data, _ = _pack_dataset(tmp)
    return Run(["pack", "-i", str(data), "-o", str(data / "spk" / "shards")], exit_codes=(1,),
               output_has=("is inside --input", str(data)), unchanged=(data,))


def _merge_output_inside_base(tmp: Path) -> Run:
    base = tmp / "base"  # refused before anything is read: no real model needed
    base.mkdir()
    (base / "config.json").write_text("{}")
    (base / "model.pth").write_bytes(b"never read")
    (tmp / "adapter.ckpt").write_bytes(b"never read")
    return Run(["merge", "--base-weight", str(base), "--lora-weight", str(tmp / "adapter.ckpt"),
                "--output", str(base / "merged")], exit_codes=(1,), output_has=("is inside base", str(base)),
               unchanged=(base,))


def _credentials(args: list[str], exit_codes=(2,)):
    def build(tmp: Path) -> Run:
        (tmp / "data").mkdir()
        return Run([a.replace("DATA", str(tmp / "data")) for a in args], exit_codes=exit_codes,
                   output_has=("AWS_ACCESS_KEY_ID",), output_lacks=(SECRET, KEY, "K7MDENG", "wJalrXUtnFEMI"))

    return build


def _store_inside_data(tmp: Path) -> Run:
    data, _ = _pack_dataset(tmp)
    return Run(["finetune", "--data", str(data), "--storage", str(data / "store")], exit_codes=(2,),
               output_has=("--storage", "inside --data"), unchanged=(data,))


def _pack_markup_in_names(tmp: Path) -> Run:
    data, _ = _pack_dataset(tmp)
    (data / "[").mkdir()
    (data / "[" / "red].lab").write_text("no codes: rejected, and its name holds [/red]")
    return Run(["pack", "-i", str(data), "-o", str(tmp / "shards")], exit_codes=(0,),
               output_has=("[/red].lab", "no codes file"), unchanged=(data,))


def _validate_markup_in_names(tmp: Path) -> Run:
    data = tmp / "data"
    write_clip(data / "anna" / "a.wav")
    write_clip(data / "[" / "bold]x[" / "x.wav", text=None)  # its path holds "[/bold]x[/x.wav"
    write_clip(data / "[red]" / "y.wav", text=None)  # a speaker whose name is a style tag
    return Run(["validate", str(data), "--report", str(tmp / "m.parquet")], exit_codes=(0,),
               output_has=("[/bold]x[/x.wav", "[red]/y.wav", "missing-transcript"), unchanged=(data,))


def _pack_symlink_loop(tmp: Path) -> Run:
    data, _ = _pack_dataset(tmp)
    (data / "spk" / "loop.lab").symlink_to(data / "spk" / "loop.lab")
    return Run(["pack", "-i", str(data), "-o", str(tmp / "shards")], exit_codes=(0,),
               output_has=("loop.lab", "Symlink loop"), unchanged=(data,),
               check=_shards_leak(tmp / "shards", b"\0never"))


def _pack_fifo_transcript(tmp: Path) -> Run:
    data, _ = _pack_dataset(tmp)
    os.mkfifo(data / "spk" / "pipe.lab")
    _codes(data / "spk" / "pipe.npy")
    return Run(["pack", "-i", str(data), "-o", str(tmp / "shards")], exit_codes=(0,), timeout=60,
               output_has=("pipe.lab", "not a regular file"), unchanged=(data,),
               check=_shards_leak(tmp / "shards", b"\0never"))


def _normalize_output_inside_input(tmp: Path) -> Run:
    data = tmp / "data"
    write_clip(data / "anna" / "a.wav")
    return Run(["normalize", str(data), str(data / "anna" / "out")], exit_codes=(2,),
               output_has=("is inside INPUT", str(data)), unchanged=(data,))


def _validate_report_inside_data(tmp: Path) -> Run:
    data = tmp / "data"
    write_clip(data / "anna" / "a.wav")
    return Run(["validate", str(data), "--report", str(data / "anna" / "m.parquet")], exit_codes=(2,),
               output_has=("--report", "is inside DATA"), unchanged=(data,))


def _synthesize_over_prompt(tmp: Path) -> Run:
    prompt = write_clip(tmp / "voice" / "prompt.wav")
    (tmp / "model").mkdir()
    (tmp / "codec.pth").write_bytes(b"never read")
    return Run(["synthesize", "--model", str(tmp / "model"), "--codec", str(tmp / "codec.pth"), "--text", "hi",
                "--prompt-audio", str(prompt), "--prompt-text", "hello there", "--output", str(prompt)],
               exit_codes=(2,), output_has=("is the --prompt-audio file",), unchanged=(tmp / "voice",))


CASES += [
    Case("paths", "pack-transcript-symlink-loop", _pack_symlink_loop),
    Case("paths", "pack-fifo-transcript", _pack_fifo_transcript),
    Case("paths", "normalize-output-inside-input", _normalize_output_inside_input),
    Case("paths", "validate-report-inside-data", _validate_report_inside_data),
    Case("paths", "synthesize-output-over-prompt-audio", _synthesize_over_prompt),

    Case("paths", "pack-transcript-symlink-out-of-root", _pack_lab_link_out),
    Case("paths", "pack-codes-symlink-out-of-root", _pack_npy_link_out),
    Case("paths", "pack-transcript-symlink-to-etc-hostname", _pack_lab_link_to_etc),
    Case("paths", "pack-output-is-input", _pack_output_is_input),
    Case("paths", "pack-output-inside-input", _pack_output_inside_input),
    Case("paths", "merge-output-inside-base", _merge_output_inside_base),
    Case("paths", "finetune-storage-with-credentials",
         _credentials(["finetune", "--data", "DATA", "--storage", f"s3://{KEY}:{SECRET}@bucket/p"])),
    Case("paths", "finetune-codec-presigned-url",
         _credentials(["finetune", "--data", "DATA", "--codec", f"s3://b/c.pth?X-Amz-Credential={KEY}&X-Amz-Signature={SECRET}"])),
    Case("paths", "doctor-storage-with-credentials",
         _credentials(["doctor", "--storage", f"s3://{KEY}:{SECRET}@bucket/p"], exit_codes=(1,))),
    Case("paths", "deploy-storage-with-credentials",
         _credentials(["deploy", "--data", "DATA", "--storage", f"s3://{KEY}:{SECRET}@bucket/p"])),
    Case("paths", "finetune-store-inside-data", _store_inside_data),
    Case("paths", "pack-rich-markup-in-names", _pack_markup_in_names),
    Case("paths", "validate-rich-markup-in-names", _validate_markup_in_names),
]
