import json

import numpy as np
import pytest

from fish_speech_core.formats.protos import (
    ProtoStreamError,
    ShardWriter,
    encode_record,
    find_proto_files,
    iter_text_data,
    make_text_data,
)
from fish_speech_core.formats.text_data_pb2 import Semantics, Sentence


@pytest.fixture
def expected_shard(reference):
    return reference / "protos" / "expected" / "00000000.protos"


def test_reads_the_reference_shard(reference, expected_shard):
    decoded = json.loads((reference / "protos" / "expected-decoded.json").read_text(encoding="utf-8"))
    records = list(iter_text_data(expected_shard))
    assert [(r.source, r.name) for r in records] == [(d["source"], d["name"]) for d in decoded]
    for record, want in zip(records, decoded):
        stems = sorted((reference / "protos" / "dataset" / record.name).glob("*.npy"))
        for sentence, want_sentence, npy in zip(record.sentences, want["sentences"], stems, strict=True):
            assert list(sentence.texts) == want_sentence["texts"]
            codes = np.array([list(s.values) for s in sentence.semantics])
            assert list(codes.shape) == want_sentence["semantics_shape"]
            np.testing.assert_array_equal(codes, np.load(npy))


def test_record_lengths_match_the_readme(expected_shard):
    assert [len(encode_record(r)) - 4 for r in iter_text_data(expected_shard)] == [2358, 867]


def test_a_folder_is_searched_recursively_in_sorted_order(tmp_path):
    for rel, name in (("b/00000000.protos", "B"), ("a/x.proto", "A"), ("c.protos", "C")):
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode_record(make_text_data(name, [("t", [[1, 2]])])))
    (tmp_path / "notes.txt").write_text("ignored")
    assert [r.name for r in iter_text_data(tmp_path)] == ["A", "B", "C"]
    assert [r.name for r in iter_text_data([tmp_path / "c.protos", tmp_path / "a"])] == ["C", "A"]


def test_empty_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no \\*.proto or \\*.protos shards in .*fishtune pack"):
        list(iter_text_data(tmp_path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_proto_files(tmp_path / "missing")


def test_empty_shard_names_the_file(tmp_path):
    (tmp_path / "00000000.protos").write_bytes(b"")
    with pytest.raises(ProtoStreamError, match="00000000.protos: empty shard"):
        list(iter_text_data(tmp_path))


def test_truncated_record_names_file_and_offset(tmp_path, expected_shard):
    data = expected_shard.read_bytes()
    cut = tmp_path / "cut.protos"
    cut.write_bytes(data[:3000])  # second record starts at 4 + 2358 = 2362
    with pytest.raises(ProtoStreamError, match=r"cut.protos: record at byte offset 2362 claims 867 bytes but only 634 remain"):
        list(iter_text_data(cut))
    cut.write_bytes(data[:2364])  # half a length prefix
    with pytest.raises(ProtoStreamError, match=r"cut.protos: truncated record at byte offset 2362: 2 byte\(s\) left"):
        list(iter_text_data(cut))


def test_records_before_the_damage_are_still_yielded(tmp_path, expected_shard):
    cut = tmp_path / "cut.protos"
    cut.write_bytes(expected_shard.read_bytes()[:3000])
    stream = iter_text_data(cut)
    assert next(stream).name == "SPK1"
    with pytest.raises(ProtoStreamError):
        next(stream)


def test_length_prefix_larger_than_the_file(tmp_path):
    bad = tmp_path / "bad.protos"
    bad.write_bytes((1 << 31).to_bytes(4, "little") + b"abc")
    with pytest.raises(ProtoStreamError, match=r"bad.protos: record at byte offset 0 claims 2147483648 bytes but only 3 remain"):
        list(iter_text_data(bad))


@pytest.mark.parametrize(
    "payload",
    [
        Sentence(texts=["hi"], semantics=[Semantics(values=[1, 2])]).SerializeToString(),
        Semantics(values=[104, 105]).SerializeToString(),  # parses as TextData(source="hi")
        b"\xff\xff\xff",
    ],
    ids=["sentence", "semantics", "garbage"],
)
def test_a_record_that_is_not_a_textdata(tmp_path, payload):
    bad = tmp_path / "bad.protos"
    bad.write_bytes(len(payload).to_bytes(4, "little") + payload)
    with pytest.raises(ProtoStreamError, match=r"bad.protos: record at byte offset 0: (not a TextData|TextData '' holds no sentences)"):
        list(iter_text_data(bad))


def test_one_speaker_one_sentence_round_trip(tmp_path):
    with ShardWriter(tmp_path) as writer:
        writer.write(make_text_data("solo", [("only line", [[0, 1023], [5, 6]])]))
    assert writer.paths == [tmp_path / "00000000.protos"]
    (record,) = iter_text_data(tmp_path)
    assert (record.source, record.name, list(record.sentences[0].texts)) == ("folder", "solo", ["only line"])
    assert [list(s.values) for s in record.sentences[0].semantics] == [[0, 1023], [5, 6]]


def test_shards_roll_over_past_the_size_limit(tmp_path):
    records = [make_text_data(f"S{i:02d}", [("x" * 100, [list(range(200))] * 8)]) for i in range(10)]
    limit_mb = 3000 / (1024 * 1024)  # ~3000 bytes: a few records per shard
    with ShardWriter(tmp_path, shard_size_mb=limit_mb) as writer:
        for r in records:
            writer.write(r)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [f"{i:08d}.protos" for i in range(len(names))] and len(names) > 1
    assert [r.name for r in iter_text_data(tmp_path)] == [r.name for r in records]
    sizes = [p.stat().st_size for p in writer.paths]
    assert all(size > 3000 for size in sizes[:-1])  # a shard closes only once past the limit
    assert all(size - len(encode_record(records[0])) <= 3000 for size in sizes)
    assert writer.bytes_written == sum(sizes)


def test_an_interrupted_writer_leaves_no_files(tmp_path):
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path, shard_size_mb=1e-4) as writer:
            for i in range(5):
                writer.write(make_text_data(f"S{i}", [("t", [list(range(100))])]))
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
