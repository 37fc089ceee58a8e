import os
import subprocess
import sys
import time

import torch
from typer.testing import CliRunner

from fish_speech_core.lm import PRESETS, DualARTransformer, load_pretrained
from fish_speech_core.lm.init_base import SPECIAL_TOKENS, build_tokenizer
from fish_speech_core.tokenizer import FishTokenizer
from fishtune.cli import app
from fishtune.cli.lm import REQUIRED_FILES

runner = CliRunner()


def init_base(out, *args):
    result = runner.invoke(app, ["init-base", str(out), *args])
    assert result.exit_code == 0, result.output
    return result


def test_init_base_tiny_loads_with_the_preset_shape(tmp_path):
    result = init_base(tmp_path / "base", "--preset", "tiny", "--seed", "0")
    assert "955,904 parameters" in result.output
    model = load_pretrained(tmp_path / "base").model
    assert model.config == PRESETS["tiny"]
    reference = DualARTransformer(PRESETS["tiny"], 5).state_dict()
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in reference.items()}
    # N(0, 0.02²) init, RMSNorm at 1
    assert abs(model.codebook_embeddings.weight.std().item() - 0.02) < 1e-3
    assert torch.equal(model.norm.weight, torch.ones(64))


def test_init_base_is_deterministic_per_seed(tmp_path):
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        init_base(tmp_path / name, "--seed", seed)
    a, b, c = (torch.load(tmp_path / n / "model.pth", weights_only=True) for n in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["output.weight"], c["output.weight"])
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()


def test_built_in_tokenizer_has_the_special_tokens_first():
    tokenizer = build_tokenizer()
    assert [tokenizer.tokenizer.id_to_token(i) for i in range(10)] == list(SPECIAL_TOKENS)
    assert (tokenizer.eos_id, tokenizer.pad_id, tokenizer.semantic_id) == (1, 2, 5)
    text = "Hola, ¿cómo estás? The weather is lovely today."
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.encode("<|im_start|>user\n")[0] == 3


def test_init_base_with_a_given_tokenizer(tmp_path, reference):
    init_base(tmp_path / "base", "--tokenizer", str(reference / "tokenizer"))
    assert (tmp_path / "base" / "tokenizer.json").read_bytes() == (reference / "tokenizer" / "tokenizer.json").read_bytes()
    assert len(FishTokenizer.from_dir(tmp_path / "base")) == 900


def test_init_base_refuses_a_non_empty_folder(tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    result = runner.invoke(app, ["init-base", str(tmp_path)], env={"COLUMNS": "200"})
    assert result.exit_code == 2
    assert "not empty; pass --force" in result.output


def test_download_offline_fails_fast_with_instructions(tmp_path):
    # Real huggingface_hub call: this machine has no internet. HF_HUB_OFFLINE makes the
    # behaviour the same on machines that do, and keeps the test fast everywhere.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "fishtune", "download", "--local-dir", str(tmp_path / "ckpt")],
        capture_output=True, text=True, env=env, timeout=60,
    )
    assert time.monotonic() - start < 30
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert "could not download fishaudio/fish-speech-1.4" in proc.stderr
    assert f"by hand into {tmp_path / 'ckpt'}/" in proc.stderr
    for name in REQUIRED_FILES:
        assert f"  {name}\n" in proc.stderr


def test_help_texts():
    for command in ("init-base", "download"):
        result = runner.invoke(app, [command, "--help"])
        assert result.exit_code == 0
    assert "--preset" in runner.invoke(app, ["init-base", "--help"]).output
    assert "--local-dir" in runner.invoke(app, ["download", "--help"]).output
