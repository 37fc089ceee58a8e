import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from fish_speech_core.formats.protos import iter_text_data
from fish_speech_core.pack import pack
from fishtune.cli import app


@pytest.fixture
def expected_bytes(reference):
    return (reference / "protos" / "expected" / "00000000.protos").read_bytes()


def _make_dataset(root, speakers=4, items=30, seed=0):
    rng = np.random.default_rng(seed)
    for s in range(speakers):
        folder = root / f"speaker{s}"
        folder.mkdir(parents=True)
        for i in range(items):
            (folder / f"{i:04d}.lab").write_text(f"Line {i} of {{noise}} speaker <b>{s}</b>.\n", encoding="utf-8")
            np.save(folder / f"{i:04d}.npy", rng.integers(0, 1024, (8, int(rng.integers(5, 40)))))
    return root


@pytest.mark.parametrize("num_workers", [1, 2])
def test_pack_is_byte_identical_to_the_reference(reference, tmp_path, expected_bytes, num_workers):
    summary = pack([reference / "protos" / "dataset"], tmp_path, num_workers=num_workers)
    assert summary.shards == [tmp_path / "00000000.protos"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000000.protos"]
    assert summary.shards[0].read_bytes() == expected_bytes
    assert (summary.speakers, summary.sentences, summary.frames) == (2, 4, 49 + 44 + 47 + 53)
    assert summary.bytes_written == 3233 and summary.rejects == []


def test_cli_pack_is_byte_identical_and_prints_a_summary(reference, tmp_path, expected_bytes):
    result = CliRunner().invoke(
        app, ["pack", "--input", str(reference / "protos" / "dataset"), "--output", str(tmp_path / "out"),
              "--num-workers", "1"],
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "00000000.protos").read_bytes() == expected_bytes
    for line in ("speakers", "sentences", "frames", "shards", "3233", "rejected items"):
        assert line in result.output


def test_many_workers_give_the_same_shards_as_one(tmp_path):
    data = _make_dataset(tmp_path / "data")
    one = pack([data], tmp_path / "one", num_workers=1, shard_size_mb=0.01)
    three = pack([data], tmp_path / "three", num_workers=3, shard_size_mb=0.01)
    assert len(one.shards) > 1 and [p.name for p in one.shards] == [p.name for p in three.shards]
    for a, b in zip(one.shards, three.shards):
        assert a.read_bytes() == b.read_bytes()
    records = list(iter_text_data(tmp_path / "one"))
    assert [r.name for r in records] == [f"speaker{s}" for s in range(4)]
    assert list(records[0].sentences[0].texts) == ["Line 0 of speaker 0 . "]


def test_bad_items_are_rejected_with_reasons_not_fatal(reference, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(reference / "protos" / "dataset", data)
    bad = data / "SPK3"
    bad.mkdir()
    (bad / "no-codes.lab").write_text("where are my codes")
    (bad / "garbage.lab").write_text("x")
    (bad / "garbage.npy").write_bytes(b"not numpy at all")
    (bad / "flat.lab").write_text("x")
    np.save(bad / "flat.npy", np.arange(10))
    (bad / "floats.lab").write_text("x")
    np.save(bad / "floats.npy", np.zeros((8, 3), dtype=np.float32))
    (bad / "latin1.lab").write_bytes("caf\xe9".encode("latin-1"))
    np.save(bad / "latin1.npy", np.zeros((8, 3), dtype=np.int64))
    (data / "SPK1" / "extra.lab").write_text("no npy here")

    summary = pack([data], tmp_path / "out")
    reasons = {r.item.rsplit("/", 2)[-2] + "/" + r.item.rsplit("/", 1)[-1]: r.reason for r in summary.rejects}
    assert set(reasons) == {"SPK1/extra.lab", "SPK3/no-codes.lab", "SPK3/garbage.lab", "SPK3/flat.lab",
                            "SPK3/floats.lab", "SPK3/latin1.lab"}
    assert reasons["SPK1/extra.lab"].startswith("no codes file extra.npy")
    assert reasons["SPK3/garbage.lab"].startswith("unreadable codes garbage.npy")
    assert "shape (10,)" in reasons["SPK3/flat.lab"]
    assert "dtype float32" in reasons["SPK3/floats.lab"]
    assert reasons["SPK3/latin1.lab"] == "transcript is not UTF-8"
    # The good items are packed exactly as before; SPK3 (nothing left) gets no record.
    assert summary.shards[0].read_bytes() == (reference / "protos" / "expected" / "00000000.protos").read_bytes()


def test_filelist_input(reference, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(reference / "protos" / "dataset", data)
    filelist = tmp_path / "list.txt"
    filelist.write_text(
        "\n".join([
            "SPK2/12.00-15.35.wav|bob|en|Bob {laugh} says | hi",
            f"{data}/SPK1/30.02-33.87.flac|alice|es|Hola <x> amiga",
            "SPK1/21.15-26.44.wav|alice|en|Hello",
            "../outside.wav|eve|en|escape attempt",
            "not a filelist line",
            "SPK1/missing.wav|alice|en|no codes",
            "",
        ]),
        encoding="utf-8",
    )
    summary = pack([data], tmp_path / "out", filelist=filelist)
    records = list(iter_text_data(tmp_path / "out"))
    assert [(r.source, r.name, [list(s.texts) for s in r.sentences]) for r in records] == [
        ("filelist", "alice", [["Hello"], ["Hola amiga"]]),
        ("filelist", "bob", [["Bob says | hi"]]),
    ]
    codes = [list(s.values) for s in records[1].sentences[0].semantics]
    np.testing.assert_array_equal(codes, np.load(data / "SPK2" / "12.00-15.35.npy"))
    reasons = sorted(r.reason.split(":")[0] for r in summary.rejects)
    assert reasons == ["malformed-filelist-line", "no codes file missing.npy (run `fishtune extract` first)",
                       "path-escapes-root"]


def test_repacking_removes_stale_shards_of_a_bigger_pack(tmp_path):
    data = _make_dataset(tmp_path / "data", speakers=3, items=10)
    assert len(pack([data], tmp_path / "out", shard_size_mb=0.001).shards) == 3
    summary = pack([data], tmp_path / "out")
    assert [p.name for p in summary.removed_stale] == ["00000001.protos", "00000002.protos"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["00000000.protos"]


def test_cli_errors_say_what_to_do(tmp_path):
    runner = CliRunner(env={"COLUMNS": "400", "TERMINAL_WIDTH": "400"})
    result = runner.invoke(app, ["pack", "--input", str(tmp_path / "nope"), "--output", str(tmp_path / "o")])
    assert result.exit_code != 0 and "is not a folder" in result.output
    (tmp_path / "empty").mkdir()
    result = runner.invoke(app, ["pack", "--input", str(tmp_path / "empty"), "--output", str(tmp_path / "o")])
    assert result.exit_code == 1 and "No *.lab transcripts found" in result.output
    only_bad = tmp_path / "bad" / "spk"
    only_bad.mkdir(parents=True)
    (only_bad / "a.lab").write_text("no codes")
    result = runner.invoke(app, ["pack", "--input", str(tmp_path / "bad"), "--output", str(tmp_path / "o")])
    assert result.exit_code == 1 and "every item was rejected" in result.output
    assert not (tmp_path / "o").exists() or list((tmp_path / "o").iterdir()) == []


def test_cli_help_documents_every_option():
    result = CliRunner().invoke(app, ["pack", "--help"], terminal_width=200)
    assert result.exit_code == 0
    for option in ("--input", "--output", "--text-extension", "--num-workers", "--shard-size", "--filelist"):
        assert option in result.output


def test_filelist_refuses_a_symlink_that_leaves_the_folder(reference, tmp_path):
    data = tmp_path / "data"
    (data / "spk").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    np.save(outside / "secret.npy", np.zeros((8, 4), dtype=np.int64))
    (data / "spk" / "link.npy").symlink_to(outside / "secret.npy")
    (data / "spk" / "link.wav").write_bytes(b"")
    np.save(data / "spk" / "ok.npy", np.ones((8, 4), dtype=np.int64))
    filelist = tmp_path / "list.txt"
    filelist.write_text("spk/link.wav|s|en|leak\nspk/ok.wav|s|en|fine\n", encoding="utf-8")
    summary = pack([data], tmp_path / "out", filelist=filelist)
    assert [r.reason.split(":")[0] for r in summary.rejects] == ["path-escapes-root"]
    assert summary.sentences == 1


def test_default_pack_workers_grow_with_items_and_stay_within_cpus():
    from fish_speech_core.pack import ITEMS_PER_WORKER, default_pack_workers

    assert default_pack_workers(28, cpus=2) == 1  # the demo set: a pool would cost more than it saves
    assert default_pack_workers(2 * ITEMS_PER_WORKER - 1, cpus=2) == 1
    assert default_pack_workers(2 * ITEMS_PER_WORKER, cpus=2) == 2
    assert default_pack_workers(10**6, cpus=2) == 2
    assert default_pack_workers(10**6, cpus=64) == 8
    assert default_pack_workers(None, cpus=4) == 4  # unknown count (filelist): one per CPU
    assert default_pack_workers(0, cpus=4) == 1


def test_nested_speaker_folders_are_rejected_never_merged_by_name(tmp_path):
    # alice/s1 and bob/s1 would both become a speaker "s1": the speakers are the folders directly
    # under the input (as validate decides), deeper items are rejected with the reason.
    data = tmp_path / "data"
    for speaker in ("alice", "bob"):
        for folder, stem in ((data / speaker, "top"), (data / speaker / "s1", "deep")):
            folder.mkdir(parents=True, exist_ok=True)
            np.save(folder / f"{stem}.npy", np.full((8, 6), 7, dtype=np.int32))
            (folder / f"{stem}.lab").write_text(f"{speaker} {stem}", encoding="utf-8")
    before = {p: p.read_bytes() for p in data.rglob("*") if p.is_file()}
    summary = pack([data], tmp_path / "out")
    records = {r.name: [s.texts[0].strip() for s in r.sentences] for r in iter_text_data(summary.shards)}
    assert records == {"alice": ["alice top"], "bob": ["bob top"]}
    assert sorted((r.item, r.reason.split(":")[0]) for r in summary.rejects) == [
        (str(data / "alice" / "s1" / "deep.lab"), "nested-speaker-folder"),
        (str(data / "bob" / "s1" / "deep.lab"), "nested-speaker-folder")]
    assert "move it into alice/" in summary.rejects[0].reason
    assert {p: p.read_bytes() for p in data.rglob("*") if p.is_file()} == before
