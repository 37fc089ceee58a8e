"""Hostile paths through the whole data pipeline (validate -> normalize -> extract -> pack).

The data root holds an escaping folder symlink, an escaping file symlink, names with a newline
and a control character; a filelist adds ``..`` and absolute paths outside the root. Every one is
refused with its reason, and a listing of everything around the output roots is unchanged.
"""

import os

import pyarrow.parquet as pq
import pytest

from fish_speech_core import dataset as ds
from fish_speech_core.codec import init_codec, save_codec
from fish_speech_core.codec.config import FireflyConfig
from tests.audio_factory import write_clip
from tests.finetune.helpers_train import run_cli


def listing(top, skip=()):
    """Every path under ``top`` (links not followed) with size and mtime, minus ``skip`` roots."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(top, followlinks=False):
        here = os.path.relpath(dirpath, top)
        dirnames[:] = [d for d in dirnames if os.path.normpath(os.path.join(here, d)) not in skip]
        for name in dirnames + filenames:
            rel = os.path.normpath(os.path.join(here, name))
            st = os.lstat(os.path.join(dirpath, name))
            found[rel] = (st.st_mode, st.st_size if not os.path.isdir(os.path.join(dirpath, name)) else 0, st.st_mtime_ns)
    return found


@pytest.fixture
def hostile(tmp_path):
    raw = tmp_path / "raw"
    write_clip(raw / "SPK1" / "good.wav", text="a fine sentence")
    outside = tmp_path / "outside"
    write_clip(outside / "secret.wav", text="outside the root", seed=1)
    write_clip(outside / "folder" / "other.wav", text="also outside", seed=2)
    (raw / "escape").symlink_to(outside / "folder", target_is_directory=True)
    (raw / "SPK1" / "link.wav").symlink_to(outside / "secret.wav")
    (raw / "SPK1" / "link.lab").write_text("linked")
    write_clip(raw / "SPK\nNEWLINE" / "n.wav", text="newline folder", seed=3)
    write_clip(raw / "SPK1" / "bell\x07.wav", text="control char", seed=4)
    return tmp_path, raw


EXPECTED_REJECTS = {
    "escape": ds.PATH_ESCAPES,
    "SPK1/link.wav": ds.PATH_ESCAPES,
    "SPK\\nNEWLINE/n.wav": ds.BAD_NAME,
    "SPK\\nNEWLINE/n.lab": ds.BAD_NAME,
    "SPK1/bell\\x07.wav": ds.BAD_NAME,
    "SPK1/bell\\x07.lab": ds.BAD_NAME,
}


def test_pipeline_refuses_escapes_and_writes_only_into_its_outputs(hostile):
    top, raw = hostile
    codec = top / "tools" / "codec.pth"
    codec.parent.mkdir()
    save_codec(init_codec(FireflyConfig.from_name("tiny")), codec)
    before = listing(top)

    result = run_cli("validate", raw, "--report", top / "reports" / "manifest.parquet")
    assert result.exit_code == 0, result.output
    table = pq.read_table(top / "reports" / "manifest.parquet").to_pylist()
    got = {r["path"]: (r["status"], r["reason"]) for r in table}
    assert got["SPK1/good.wav"] == ("accepted", "")
    for path, reason in EXPECTED_REJECTS.items():
        assert got[path] == ("rejected", reason), path
    assert len(got) == 1 + len(EXPECTED_REJECTS)

    result = run_cli("normalize", raw, top / "norm", "--num-workers", "1")
    assert result.exit_code == 0, result.output
    audio = sorted(p.relative_to(top / "norm").as_posix() for p in (top / "norm").rglob("*") if p.suffix == ".wav")
    assert audio == ["SPK1/good.wav"]

    result = run_cli("extract", top / "norm", "--checkpoint-path", codec, "--preset", "tiny", "--num-workers", "0")
    assert result.exit_code == 0, result.output
    result = run_cli("pack", "--input", top / "norm", "--output", top / "packed", "--num-workers", "1")
    assert result.exit_code == 0, result.output

    # Nothing changed outside the three output roots: not raw/, not outside/, not the codec.
    after = listing(top, skip={"reports", "norm", "packed"})
    assert after == {k: v for k, v in before.items()}
    written = {p.relative_to(top).as_posix() for root in ("norm", "packed") for p in (top / root).rglob("*")
               if p.is_file() and not p.relative_to(top / root).as_posix().startswith(".fishtune")}
    assert written == {"norm/SPK1/good.wav", "norm/SPK1/good.lab", "norm/SPK1/good.npy",
                       "norm/SPK1/good.npy.json", "packed/00000000.protos"}  # .json: completion record


def test_filelist_with_dotdot_and_absolute_paths(hostile):
    top, raw = hostile
    filelist = top / "list.txt"
    filelist.write_text(
        "SPK1/good.wav|anna|en|fine\n"
        "../outside/secret.wav|eve|en|dotdot\n"
        f"{top / 'outside' / 'secret.wav'}|eve|en|absolute\n"
        "escape/other.wav|eve|en|through the folder link\n"
        "SPK1/link.wav|eve|en|through the file link\n",
        encoding="utf-8",
    )
    before = listing(top)
    result = run_cli("normalize", raw, top / "norm", "--filelist", filelist, "--num-workers", "1")
    assert result.exit_code == 0, result.output
    audio = sorted(p.relative_to(top / "norm").as_posix() for p in (top / "norm").rglob("*.wav"))
    assert audio == ["SPK1/good.wav"]
    assert listing(top, skip={"norm"}) == before
