"""fishtune doctor: real tiny checkpoints from init-base/init-codec, broken on purpose."""

import json
import shutil

import pytest
from typer.testing import CliRunner

from fish_speech_core.doctor import (
    check_base,
    check_compatibility,
    check_storage,
    expected_codebook_size,
    has_errors,
)
from fishtune.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(base folder, codec .pth) made by the real CLI commands."""
    root = tmp_path_factory.mktemp("doctor")
    assert runner.invoke(app, ["init-base", str(root / "base"), "--preset", "tiny"]).exit_code == 0
    assert runner.invoke(app, ["init-codec", str(root / "codec.pth"), "--preset", "tiny"]).exit_code == 0
    return root / "base", root / "codec.pth"


def _copy_base(base, dest, **config_changes):
    shutil.copytree(base, dest)
    config = json.loads((dest / "config.json").read_text())
    config.update(config_changes)
    (dest / "config.json").write_text(json.dumps(config))
    return dest


def test_expected_codebook_size_is_the_next_power_of_two():
    assert expected_codebook_size((8, 5, 5, 5)) == 1024  # fish-speech-1.4: 1000 values
    assert expected_codebook_size((8, 8, 8, 8)) == 4096
    assert expected_codebook_size((4, 4)) == 16


def test_matching_pair_passes(pair, tmp_path):
    base, codec = pair
    findings = check_compatibility(base, codec)
    assert not has_errors(findings)
    assert [f.level for f in findings] == ["ok"]
    assert "8 codebooks of 1000 values in a 1024-way head" in findings[0].what
    result = runner.invoke(app, ["doctor", "--base", str(base), "--codec", str(codec),
                                 "--storage", str(tmp_path / "store"), "--json"])
    assert result.exit_code == 0, result.output
    levels = {f["level"] for f in json.loads(result.output)}
    assert "error" not in levels
    assert list((tmp_path / "store").iterdir()) == []  # the probe object was removed


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"codebook_size": 2048}, ["codebook_size is 2048", "give 1000 values", "codebook_size 1024"]),
        ({"codebook_size": 512}, ["codebook_size is 512", "codes up to 999 (stored as code + 1 = 1000) would index past"]),
        ({"num_codebooks": 4}, ["num_codebooks is 4", "makes 8 code rows"]),
    ],
)
def test_mismatched_pair_is_an_error_naming_both_values(pair, tmp_path, change, named):
    base, codec = pair
    broken = _copy_base(base, tmp_path / "base", **change)
    findings = check_compatibility(broken, codec)
    errors = [f for f in findings if f.level == "error"]
    assert len(errors) == 1
    for text in named:
        assert text in errors[0].what
    assert "same Fish Speech release" in errors[0].what_to_do
    result = runner.invoke(app, ["doctor", "--base", str(broken), "--codec", str(codec)])
    assert result.exit_code == 1
    assert "ERROR" in result.output and "Traceback" not in result.output


def test_codec_preset_name_and_released_generator_without_config(pair, tmp_path):
    import torch

    base, codec = pair
    assert not has_errors(check_compatibility(base, "tiny"))
    # A bare state dict (like the released generator .pth) has no stored config: 1.4 assumed.
    bare = tmp_path / "generator.pth"
    torch.save(torch.load(codec, weights_only=True)["state_dict"], bare)
    findings = check_compatibility(base, bare)
    assert [f.level for f in findings] == ["ok"]
    assert "assumed fish-speech-1.4" in findings[0].what


def test_codec_with_code_in_its_pickle_is_reported_not_run(pair, tmp_path):
    from tests.hardening.hostile import write_marker_pickle

    base, _ = pair
    marker = tmp_path / "pwned"
    evil = write_marker_pickle(tmp_path / "evil.pth", marker)
    findings = check_compatibility(base, evil)
    assert [f.level for f in findings] == ["error"]
    assert "cannot read the codec" in findings[0].what
    assert not marker.exists()


def test_tokenizer_missing_a_special_token(pair, tmp_path):
    base, _ = pair
    broken = _copy_base(base, tmp_path / "base")
    data = json.loads((broken / "tokenizer.json").read_text())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != "<|semantic|>"]
    data["model"]["vocab"].pop("<|semantic|>")
    (broken / "tokenizer.json").write_text(json.dumps(data))
    errors = [f for f in check_base(broken) if f.level == "error"]
    assert len(errors) == 1
    assert "lacks the special tokens ['<|semantic|>']" in errors[0].what
    assert "fish-speech-1.4" in errors[0].what_to_do


def test_missing_base_files_are_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    whats = [f.what for f in check_base(tmp_path / "empty") if f.level == "error"]
    assert len(whats) == 3
    assert any("config.json not found" in w for w in whats)
    assert any("model.pth not found" in w for w in whats)
    assert any("tokenizer.json not found" in w for w in whats)
    result = runner.invoke(app, ["doctor", "--base", str(tmp_path / "nowhere")])
    assert result.exit_code == 1


def test_unwritable_storage_root(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    findings = check_storage(str(blocker / "store"))
    assert [f.level for f in findings] == ["error"]
    assert "is not writable" in findings[0].what
    assert "permissions" in findings[0].what_to_do
    result = runner.invoke(app, ["doctor", "--storage", str(blocker / "store")])
    assert result.exit_code == 1
    assert blocker.read_text() == "not a folder"


def test_writable_local_storage_leaves_nothing_behind(tmp_path):
    findings = check_storage(str(tmp_path / "store"))
    assert [f.level for f in findings] == ["ok"]
    assert list((tmp_path / "store").iterdir()) == []


def test_doctor_help():
    result = runner.invoke(app, ["doctor", "--help"])
    assert result.exit_code == 0
    for option in ("--base", "--codec", "--storage", "--json"):
        assert option in result.output


def test_a_codec_config_is_read_once_per_content(pair, tmp_path, monkeypatch):
    """The flow's base/codec check on an unchanged codec never opens it again (that imports torch)."""
    import torch

    from fish_speech_core import doctor, hashcache

    base, codec = pair
    monkeypatch.setenv(hashcache.CACHE_ENV, str(tmp_path / "memo" / "hashes.sqlite"))
    opened = []
    real = doctor._stored_codec_config
    monkeypatch.setattr(doctor, "_stored_codec_config", lambda path: opened.append(path.name) or real(path))
    monkeypatch.setattr(hashcache, "_DERIVED", {})
    first = doctor.read_codec_config(codec)
    monkeypatch.setattr(hashcache, "_DERIVED", {})  # the next process: only the memo folder remains
    assert doctor.read_codec_config(codec) == first and opened == ["codec.pth"]
    bare = tmp_path / "generator.pth"  # other bytes (no stored config): read, and remembered as such
    torch.save(torch.load(codec, weights_only=True)["state_dict"], bare)
    assert "assumed fish-speech-1.4" in doctor.read_codec_config(bare)[1]
    monkeypatch.setattr(hashcache, "_DERIVED", {})
    assert "assumed fish-speech-1.4" in doctor.read_codec_config(bare)[1] and opened == ["codec.pth", "generator.pth"]
    for stored in (tmp_path / "memo" / "derived" / "codec-config").iterdir():  # a damaged memo is a miss
        stored.write_text("{not json")
    monkeypatch.setattr(hashcache, "_DERIVED", {})
    assert doctor.read_codec_config(codec) == first and opened[-1] == "codec.pth"
