"""Hostile inputs, round two (issue 12): paths, credentials, outputs, concurrency.

Each test builds the hostile input for real (symlinks, read-only folders, a second process holding
a temp file) and asserts the outcome: the reason, the exit status, that the rest went on and that
the inputs' bytes are unchanged.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fish_speech_core import storage
from fish_speech_core.dataset import PATH_ESCAPES
from fish_speech_core.files import OverlapError, atomic_path, is_abandoned, refuse_overlap, remove_temporaries
from fish_speech_core.formats.protos import iter_text_data
from fish_speech_core.normalize import normalize_tree
from fish_speech_core.pack import pack
from fishtune.cli import app
from tests.audio_factory import tree_digest, write_clip

SECRET = "wJalrXUtnFEMI/K7MDENG+bPxRfiCY"
KEY = "AKIAIOSFODNN7EXAMPLE"


def _cli(*args) -> tuple[int, str]:
    result = CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "400"})
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.output


def _item(folder: Path, stem: str, text: str, frames: int = 7) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{stem}.lab").write_text(text, encoding="utf-8")
    np.save(folder / f"{stem}.npy", np.arange(8 * frames, dtype=np.int64).reshape(8, frames) % 1024)


def _texts(shards) -> list[str]:
    return [s.texts[0] for record in iter_text_data(shards) for s in record.sentences]


# ------------------------------------------------------------------ 1. pack never reads outside its input


def test_pack_refuses_transcript_and_codes_symlinks_out_of_the_input(tmp_path):
    data, outside = tmp_path / "data", tmp_path / "outside"
    _item(data / "spk", "good", "a good line")
    _item(outside, "secret", "secret outside text")
    (data / "spk" / "lab_out.lab").symlink_to(outside / "secret.lab")  # transcript leaves the root
    np.save(data / "spk" / "lab_out.npy", np.zeros((8, 5), dtype=np.int64))
    (data / "spk" / "npy_out.lab").write_text("codes come from outside")
    (data / "spk" / "npy_out.npy").symlink_to(outside / "secret.npy")  # codes leave the root
    (data / "spk" / "loop.lab").symlink_to(data / "spk" / "loop.lab")  # a symlink loop
    (data / "spk" / "inside.lab").symlink_to(data / "spk" / "good.lab")  # stays inside: fine
    np.save(data / "spk" / "inside.npy", np.ones((8, 4), dtype=np.int64))
    before = tree_digest(outside)

    code, output = _cli("pack", "-i", data, "-o", tmp_path / "shards")

    assert code == 0, output
    shards = sorted((tmp_path / "shards").glob("*.protos"))
    assert sorted(_texts(shards)) == ["a good line", "a good line"]  # good + the inside link
    assert "secret" not in " ".join(_texts(shards))
    rejected = [line for line in output.splitlines() if line.startswith("rejected")]
    for stem in ("lab_out", "npy_out", "loop"):
        assert any(f"{stem}.lab" in line and PATH_ESCAPES in line for line in rejected), output
    assert tree_digest(outside) == before


def test_pack_filelist_codes_link_out_of_root_is_rejected(tmp_path):
    data, outside = tmp_path / "data", tmp_path / "outside"
    _item(data / "spk", "a", "first")
    _item(outside, "b", "outside")
    (data / "spk" / "b.npy").symlink_to(outside / "b.npy")
    filelist = tmp_path / "list.txt"
    filelist.write_text("spk/a.wav|spk|en|first\nspk/b.wav|spk|en|second\n")
    summary = pack([data], tmp_path / "shards", filelist=filelist)
    assert _texts(summary.shards) == ["first"]
    assert [r.item for r in summary.rejects] == ["spk/b.wav"] and PATH_ESCAPES in summary.rejects[0].reason


def test_normalize_rechecks_the_root_when_it_copies_a_transcript(tmp_path):
    """A transcript re-pointed out of the root after validation is not copied into OUTPUT."""
    from fish_speech_core import normalize as nz

    src, outside = tmp_path / "in", tmp_path / "outside"
    write_clip(src / "spk" / "a.wav")
    outside.mkdir()
    (outside / "secret.lab").write_text("SECRET TRANSCRIPT")
    job = nz._Job("spk/a.wav", src / "spk" / "a.wav", tmp_path / "out" / "spk" / "a.wav", src / "spk" / "a.lab",
                  None, tmp_path / "out" / "spk" / "a.lab", tmp_path / "out" / ".fishtune" / "a.json", "",
                  nz.NormalizeSettings(), True, input_root=src)
    (src / "spk" / "a.lab").unlink()
    (src / "spk" / "a.lab").symlink_to(outside / "secret.lab")
    result = nz.normalize_file(job)
    assert result.status == "failed" and PATH_ESCAPES in result.detail
    assert not (tmp_path / "out" / "spk" / "a.lab").exists()


# ------------------------------------------------------------------ 2. credentials in URLs


@pytest.mark.parametrize("url", [
    f"s3://{KEY}:{SECRET}@bucket/prefix",  # the secret holds a '/': user info past the netloc
    f"s3://{KEY}:{SECRET.replace('/', '')}@bucket/prefix",
    f"s3://{KEY}@bucket/prefix",
    f"s3://bucket/prefix?X-Amz-Credential={KEY}&X-Amz-Signature={SECRET}",
    f"https://user:{SECRET}@minio.local/bucket",
])
def test_urls_with_credentials_are_refused_without_echoing_them(url):
    with pytest.raises(storage.CredentialsInURLError) as refused:
        storage.refuse_credentials(url)
    message = str(refused.value)
    assert SECRET not in message and KEY not in message and SECRET.split("/")[1] not in message
    assert "AWS_ACCESS_KEY_ID" in message and "AWS_PROFILE" in message
    with pytest.raises(storage.CredentialsInURLError):
        storage.Store(url)
    with pytest.raises(storage.CredentialsInURLError):
        storage.filesystem(url)


@pytest.mark.parametrize("url", ["s3://bucket/take@2/x", "/home/a@b/data", "s3://bucket/p", "file:///tmp/x@y"])
def test_urls_without_credentials_pass(url):
    assert storage.refuse_credentials(url) == url


def test_finetune_and_doctor_and_deploy_refuse_credentials_in_one_line(tmp_path):
    url = f"s3://{KEY}:{SECRET}@bucket/p"
    for args in (
        ["finetune", "--data", tmp_path, "--storage", url],
        ["finetune", "--data", url],
        ["finetune", "--data", tmp_path, "--codec", url],
        ["doctor", "--storage", url],
    ):
        code, output = _cli(*args)
        assert code in (1, 2), (args, output)
        assert SECRET not in output and KEY not in output and "K7MDENG" not in output, output
        assert "AWS_ACCESS_KEY_ID" in output and "Traceback" not in output
    # Prefect was never reached: nothing could have stored the parameters
    assert not (tmp_path / "fishtune-store").exists()


def test_rich_markup_in_file_names_is_printed_literally(tmp_path):
    data = tmp_path / "data"
    _item(data / "spk", "good", "fine")
    (data / "[").mkdir()
    (data / "[" / "red].lab").write_text("no codes beside me")  # its label holds "[/red]": a MarkupError
    (data / "[bold]spk").mkdir()
    (data / "[bold]spk" / "b.lab").write_text("no codes either")
    code, output = _cli("pack", "-i", data, "-o", tmp_path / "shards")
    assert code == 0, output
    assert "[/red].lab" in output and "[bold]spk/b.lab" in output


# ------------------------------------------------------------------ 3. outputs never overlap inputs


def test_refuse_overlap_names_both_paths(tmp_path):
    a = tmp_path / "in"
    a.mkdir()
    for output, phrase in ((a, "is the INPUT folder"), (a / "sub", "is inside INPUT"), (tmp_path, "is inside OUTPUT")):
        with pytest.raises(OverlapError, match=phrase) as refused:
            refuse_overlap([("INPUT", a)], output)
        assert str(a) in str(refused.value) and str(output) in str(refused.value)
    (tmp_path / "link").symlink_to(a)
    with pytest.raises(OverlapError):  # a symlinked output that lands in the input
        refuse_overlap([("INPUT", a)], tmp_path / "link" / "out")
    refuse_overlap([("INPUT", a)], tmp_path / "elsewhere")


def test_pack_output_equal_to_input_keeps_a_shard_named_user_file(tmp_path):
    data = tmp_path / "data"
    _item(data / "spk", "a", "hello")
    (data / "00000007.protos").write_bytes(b"my own file")
    before = tree_digest(data)
    for output in (data, data / "spk", tmp_path):
        code, output_text = _cli("pack", "-i", data, "-o", output)
        assert code == 1 and "inputs are never modified" in output_text and str(data) in output_text
    assert tree_digest(data) == before


def test_merge_train_and_init_base_refuse_outputs_inside_their_inputs(tmp_path):
    base = tmp_path / "base"
    assert _cli("init-base", base, "--preset", "tiny")[0] == 0
    before = tree_digest(base)
    code, output = _cli("merge", "--base-weight", base, "--lora-weight", tmp_path / "none.ckpt", "--output", base / "sub")
    assert code == 1 and "is inside base" in output and str(base) in output
    _item(tmp_path / "data" / "spk", "a", "hello")  # real shards: train checks --data against the base first
    assert _cli("pack", "-i", tmp_path / "data", "-o", tmp_path / "protos")[0] == 0
    before = tree_digest(base)
    code, output = _cli("train", "--project", "p", "--base", base, "--data", tmp_path / "protos", "--results-dir", base)
    assert code == 1 and "run folder" in output and "inside --base" in output
    code, output = _cli("init-base", base / "tok", "--tokenizer", base)
    assert code == 2 and "inside --tokenizer" in output
    assert tree_digest(base) == before


def test_finetune_refuses_a_store_inside_the_data(tmp_path):
    code, output = _cli("finetune", "--data", tmp_path, "--storage", tmp_path / "store")
    assert code == 2 and "--storage" in output and "inside --data" in output


# ------------------------------------------------------------------ 6. content keys follow symlinks


def test_content_keys_hash_what_a_symlink_points_to(tmp_path):
    from fishtune.tasks.data import VALIDATE
    from fishtune.tasks.params import ValidateParams

    data, clips = tmp_path / "data", tmp_path / "data" / "clips"
    write_clip(clips / "one.wav", seed=1, text=None)
    write_clip(clips / "two.wav", seed=2, text=None)
    (data / "spk").mkdir()
    (data / "spk" / "a.wav").symlink_to(clips / "one.wav")
    (data / "spk" / "a.lab").write_text("hello there")
    policy, params = VALIDATE.cache_policy, ValidateParams()
    listed = storage.list_files(str(data))
    assert "spk/a.wav" in listed  # fsspec alone skips links
    key_before = policy.compute_key(None, {"data_dir": str(data), "params": params}, {})
    tree_before = storage.hash_tree(str(data))

    (data / "spk" / "a.wav").unlink()
    (data / "spk" / "a.wav").symlink_to(clips / "two.wav")  # re-point: same name, other clip

    assert storage.hash_tree(str(data)) != tree_before
    assert policy.compute_key(None, {"data_dir": str(data), "params": params}, {}) != key_before
    mirror = tmp_path / "mirror"
    storage.sync_tree(str(data), mirror)  # the flow's data mirror copies the content, not the link
    assert not (mirror / "spk" / "a.wav").is_symlink()
    assert (mirror / "spk" / "a.wav").read_bytes() == (clips / "two.wav").read_bytes()


def test_links_out_of_the_root_are_never_mirrored_but_change_the_key(tmp_path):
    data, outside = tmp_path / "data", tmp_path / "outside"
    write_clip(data / "spk" / "a.wav")
    write_clip(outside / "x.wav", seed=3)
    write_clip(outside / "y.wav", seed=4)
    (data / "spk" / "b.wav").symlink_to(outside / "x.wav")
    key = storage.hash_tree(str(data))
    assert "spk/b.wav" not in storage.list_files(str(data))
    storage.sync_tree(str(data), tmp_path / "mirror")
    assert not (tmp_path / "mirror" / "spk" / "b.wav").exists()
    (data / "spk" / "b.wav").unlink()
    (data / "spk" / "b.wav").symlink_to(outside / "y.wav")
    assert storage.hash_tree(str(data)) != key


def test_normalize_redoes_a_file_whose_link_was_re_pointed(tmp_path):
    src, clips = tmp_path / "in", tmp_path / "in" / "clips"
    write_clip(clips / "one.wav", seed=1, text=None, seconds=1.0)
    write_clip(clips / "two.wav", seed=2, text=None, seconds=2.0)
    (src / "spk").mkdir()
    (src / "spk" / "a.wav").symlink_to(clips / "one.wav")
    (src / "spk" / "a.lab").write_text("hello there")
    out = tmp_path / "out"
    first = normalize_tree(src, out, show_progress=False)
    assert {r.rel_path: r.status for r in first.results}["spk/a.wav"] == "written"
    (src / "spk" / "a.wav").unlink()
    (src / "spk" / "a.wav").symlink_to(clips / "two.wav")
    second = {r.rel_path: r for r in normalize_tree(src, out, show_progress=False).results}
    assert second["spk/a.wav"].status == "written"  # a miss, not "skipped"
    assert second["spk/a.wav"].duration == pytest.approx(2.0)  # the new clip's content


# ------------------------------------------------------------------ 5. concurrent writers keep their temps

_HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from fish_speech_core.files import atomic_path
    with atomic_path(Path(sys.argv[1])) as tmp:
        tmp.write_bytes(b"in flight")
        print(tmp, flush=True)
        while not Path(sys.argv[2]).exists():
            time.sleep(0.05)
""")


def _holder(target: Path, release: Path) -> tuple[subprocess.Popen, Path]:
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(target), str(release)], stdout=subprocess.PIPE,
                            text=True, cwd=Path(__file__).resolve().parents[2])
    return proc, Path(proc.stdout.readline().strip())


def test_sweeps_skip_a_live_writers_temp_and_take_a_dead_ones(tmp_path):
    target, release = tmp_path / "spk" / "a.npy", tmp_path / "release"
    live, live_tmp = _holder(target, release)
    try:
        assert live_tmp.is_file() and not is_abandoned(live_tmp)
        assert remove_temporaries([target]) == [] and live_tmp.is_file()
    finally:
        release.touch()
        assert live.wait(30) == 0
    assert target.read_bytes() == b"in flight" and not live_tmp.exists()

    release.unlink()
    dead, dead_tmp = _holder(tmp_path / "spk" / "b.npy", release)
    dead.send_signal(signal.SIGKILL)
    dead.wait(30)
    assert dead_tmp.is_file() and is_abandoned(dead_tmp)
    assert remove_temporaries([tmp_path / "spk" / "b.npy"]) == [dead_tmp]


@pytest.mark.slow
def test_second_normalize_on_one_output_leaves_the_first_ones_temp(tmp_path):
    """Two processes on one OUTPUT: one mid-write (its temp in OUTPUT), one full ``fishtune normalize``."""
    src, out, release = tmp_path / "in", tmp_path / "out", tmp_path / "release"
    write_clip(src / "spk" / "a.wav")
    write_clip(src / "spk" / "b.wav", seed=1)
    first, first_tmp = _holder(out / "spk" / "a.wav", release)
    try:
        second = subprocess.run([sys.executable, "-m", "fishtune", "normalize", str(src), str(out)],
                                capture_output=True, text=True, timeout=300)
        assert second.returncode == 0, second.stderr
        assert first_tmp.is_file(), "the second normalize swept the first one's in-flight temp"
    finally:
        release.touch()
        assert first.wait(30) == 0  # its rename succeeded
    # a killed normalize's temp is swept by the next run
    release.unlink()
    killed, killed_tmp = _holder(out / "spk" / "b.wav", release)
    killed.send_signal(signal.SIGKILL)
    killed.wait(30)
    assert killed_tmp.is_file()
    third = subprocess.run([sys.executable, "-m", "fishtune", "normalize", str(src), str(out)],
                           capture_output=True, text=True, timeout=300)
    assert third.returncode == 0 and not killed_tmp.exists()


def test_pack_sweep_keeps_a_concurrent_packs_temp_shard(tmp_path):
    data, shards, release = tmp_path / "data", tmp_path / "shards", tmp_path / "release"
    _item(data / "spk", "a", "hello")
    other, other_tmp = _holder(shards / "00000000.protos", release)
    try:
        pack([data], shards)
        assert other_tmp.is_file()
    finally:
        release.touch()
        other.wait(30)


# ------------------------------------------------------------------ 4. read-only output folders


def _as_unprivileged() -> list[str]:
    """Root ignores permission bits: drop the capabilities that let it, so 0555 means read-only."""
    return ["setpriv", "--bounding-set", "-dac_override,-dac_read_search,-fowner", "--"] if os.geteuid() == 0 else []


def _run_readonly(args: list, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*_as_unprivileged(), sys.executable, "-m", "fishtune", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)


def _one_clear_line(done: subprocess.CompletedProcess, folder: Path) -> None:
    text = done.stdout + done.stderr
    assert done.returncode != 0 and "Traceback" not in text, text
    assert "not writable" in text or "cannot write into" in text, text
    assert str(folder) in text.replace("\n", "").replace("│", "").replace(" ", "") or str(folder) in text, text


@pytest.mark.slow
def test_read_only_outputs_give_one_line_naming_the_folder(tmp_path):
    from fish_speech_core.codec import init_codec, save_codec
    from fish_speech_core.codec.config import FireflyConfig

    readonly = tmp_path / "ro"
    readonly.mkdir()
    data = tmp_path / "data"
    write_clip(data / "spk" / "a.wav")
    _item(tmp_path / "packin" / "spk", "a", "hello")
    save_codec(init_codec(FireflyConfig.from_name("tiny"), seed=0), tmp_path / "codec.pth")
    ro_data = tmp_path / "ro-data"
    write_clip(ro_data / "spk" / "a.wav")
    readonly.chmod(0o555)
    (ro_data / "spk").chmod(0o555)
    commands = [  # (arguments, the folder the error must name); independent processes: two at a time
        (["normalize", data, readonly], readonly),
        (["pack", "-i", tmp_path / "packin", "-o", readonly], readonly),
        (["merge", "--base-weight", tmp_path / "base", "--lora-weight", tmp_path / "x.ckpt", "--output",
          readonly / "merged"], readonly / "merged"),
        (["train", "--project", "p", "--base", tmp_path / "base", "--data", tmp_path / "protos", "--results-dir",
          readonly], readonly / "p"),
        (["extract", ro_data, "--checkpoint-path", tmp_path / "codec.pth", "--preset", "tiny", "--num-workers", "0"],
         ro_data / "spk"),
    ]
    try:
        with ThreadPoolExecutor(2) as pool:
            done = list(pool.map(_run_readonly, [args for args, _ in commands]))
        for result, (_, folder) in zip(done, commands):
            _one_clear_line(result, folder)
    finally:
        readonly.chmod(0o755)
        (ro_data / "spk").chmod(0o755)


# ------------------------------------------------------------------ 7. Prefect's ephemeral server


def test_ephemeral_startup_timeout_default_is_generous_and_the_users_wins(monkeypatch):
    from fishtune.cli import flows as cli_flows

    monkeypatch.delenv(cli_flows.STARTUP_TIMEOUT_ENV, raising=False)
    cli_flows._prefect_defaults()
    assert os.environ[cli_flows.STARTUP_TIMEOUT_ENV] == str(cli_flows.EPHEMERAL_STARTUP_TIMEOUT_S) == "600"
    monkeypatch.setenv(cli_flows.STARTUP_TIMEOUT_ENV, "42")
    cli_flows._prefect_defaults()
    assert os.environ[cli_flows.STARTUP_TIMEOUT_ENV] == "42"


@pytest.mark.slow
def test_ephemeral_server_that_does_not_start_is_one_line_with_the_fix(tmp_path):
    data = tmp_path / "data"
    write_clip(data / "spk" / "a.wav")
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env |= {"PREFECT_HOME": str(tmp_path / "home"), "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "0",
            "COLUMNS": "300"}
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "fishtune", "finetune", "--data", str(data), "--storage",
                           str(tmp_path / "store")], capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    text = done.stdout + done.stderr
    assert done.returncode == 1 and "Traceback" not in text, text
    line = next(line for line in text.splitlines() if "finetune failed" in line)
    assert "did not start within 0 s" in line and "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS" in line
    assert "PREFECT_API_URL" in line
    assert time.monotonic() - started < 120


def test_preview_clips_never_come_from_outside_the_data(tmp_path):
    from fish_speech_core.evaluate.selection import speaker_clips

    data, outside = tmp_path / "data", tmp_path / "outside"
    write_clip(data / "spk" / "a.wav")
    write_clip(outside / "secret.wav", text="secret words")
    (data / "spk" / "b.wav").symlink_to(outside / "secret.wav")
    (data / "spk" / "b.lab").write_text("fine")
    (data / "spk" / "c.wav").symlink_to(data / "spk" / "a.wav")  # inside: fine
    (data / "spk" / "c.lab").symlink_to(outside / "secret.lab")  # transcript outside: not a clip
    (data / "spk" / "d.wav").symlink_to(data / "spk" / "a.wav")
    (data / "spk" / "d.lab").write_text("kept")
    clips = speaker_clips(data)
    assert sorted(c.audio.name for c in clips["spk"]) == ["a.wav", "d.wav"]


def test_extract_never_trusts_a_symlinked_npy(tmp_path):
    import shutil

    from fish_speech_core.codec import init_codec
    from fish_speech_core.codec.config import FireflyConfig
    from fish_speech_core.codec.extract import ExtractSettings, extract, plan_extraction, sidecar_path_for

    model = init_codec(FireflyConfig.from_name("tiny"), seed=0)
    audio = write_clip(tmp_path / "data" / "spk" / "a.wav", seconds=0.5)
    settings = ExtractSettings(num_workers=0, batch_size=1)
    extract(model, [audio], settings)
    assert plan_extraction([audio], model, settings).skipped  # up to date: a regular file we wrote
    npy = audio.with_suffix(".npy")
    outside = tmp_path / "outside.npy"
    shutil.move(npy, outside)
    npy.symlink_to(outside)  # same bytes, so the sidecar's hashes still match
    plan = plan_extraction([audio], model, settings)
    assert [job.audio_path for job in plan.todo] == [audio] and not plan.skipped
    extract(model, [audio], settings)
    assert not npy.is_symlink() and outside.is_file() and sidecar_path_for(npy).is_file()


def test_pack_rejects_fifos_by_name_instead_of_blocking(tmp_path):
    data = tmp_path / "data"
    _item(data / "spk", "good", "fine")
    os.mkfifo(data / "spk" / "pipe.lab")
    np.save(data / "spk" / "pipe.npy", np.zeros((8, 3), dtype=np.int64))
    (data / "spk" / "codes.lab").write_text("codes are a pipe")
    os.mkfifo(data / "spk" / "codes.npy")
    summary = pack([data], tmp_path / "shards")
    reasons = {Path(r.item).name: r.reason for r in summary.rejects}
    assert reasons == {"pipe.lab": "transcript pipe.lab is not a regular file",
                       "codes.lab": "codes codes.npy is not a regular file"}
    assert _texts(summary.shards) == ["fine"]


def test_synthesize_and_decode_never_write_over_their_inputs(tmp_path):
    prompt = write_clip(tmp_path / "prompt.wav")
    codes = tmp_path / "codes.npy"
    np.save(codes, np.zeros((8, 4), dtype=np.int64))
    before = prompt.read_bytes(), codes.read_bytes()
    (tmp_path / "m").mkdir()
    (tmp_path / "c.pth").write_bytes(b"never read")
    code, output = _cli("synthesize", "--model", tmp_path / "m", "--codec", tmp_path / "c.pth", "--text", "hi",
                        "--prompt-audio", prompt, "--prompt-text", "hello there", "--output", prompt)
    assert code == 2 and "is the --prompt-audio file" in output
    code, output = _cli("decode", codes, "--checkpoint-path", tmp_path / "c.pth", "--output", codes)
    assert code == 2 and "is the CODES_FILE file" in output
    assert (prompt.read_bytes(), codes.read_bytes()) == before


def test_reports_are_never_written_into_the_dataset(tmp_path):
    data = tmp_path / "data"
    write_clip(data / "spk" / "a.wav")
    before = tree_digest(data)
    code, output = _cli("validate", data, "--report", data / "spk" / "m.parquet")
    assert code == 2 and "--report" in output and "is inside DATA" in output
    code, output = _cli("normalize", data, tmp_path / "out", "--report", data / "r.json")
    assert code == 2 and "is inside INPUT" in output
    assert tree_digest(data) == before and not (tmp_path / "out").exists()
