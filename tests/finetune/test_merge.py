"""fishtune merge on the reference LoRA checkpoint (fixtures README section 5) and its refusals."""

from __future__ import annotations

import pytest
import torch

from fish_speech_core.finetune.lora import LoraSettings, add_lora, lora_state_dict, save_metadata, LoraMetadata
from fish_speech_core.files import sha256_file
from fish_speech_core.lm import load_pretrained
from tests.finetune.helpers_train import run_cli


def test_reference_checkpoint_merges_to_reference_weights(reference, tmp_path):
    out = tmp_path / "merged"
    result = run_cli("merge", "--lora-config", "r_8_alpha_16", "--base-weight", reference / "tiny-llama",
                     "--lora-weight", reference / "lora" / "lora-ckpt.ckpt", "--output", out)
    assert result.exit_code == 0, result.output
    assert "adapter carried no metadata" in result.output
    ours = torch.load(out / "model.pth", weights_only=True)
    ref = torch.load(reference / "lora" / "merged" / "model.pth", weights_only=True)
    assert list(ours) == list(ref)
    for key, tensor in ref.items():
        assert ours[key].dtype == tensor.dtype, key
        torch.testing.assert_close(ours[key], tensor, atol=1e-6, rtol=0)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (out / name).read_bytes() == (reference / "lora" / "merged" / name).read_bytes(), name


def test_safetensors_output(reference, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "st"
    result = run_cli("merge", "--base-weight", reference / "tiny-llama", "--lora-weight",
                     reference / "lora" / "lora-ckpt.ckpt", "--output", out, "--format", "safetensors")
    assert result.exit_code == 0, result.output
    ref = torch.load(reference / "lora" / "merged" / "model.pth", weights_only=True)
    ours = load_file(str(out / "model.safetensors"))
    assert set(ours) == set(ref)
    assert all(torch.equal(ours[k], ref[k]) for k in ref)


def test_refuses_to_overwrite_the_base(reference):
    result = run_cli("merge", "--base-weight", reference / "tiny-llama", "--lora-weight",
                     reference / "lora" / "lora-ckpt.ckpt", "--output", reference / "tiny-llama")
    assert result.exit_code == 1 and "is the base folder" in result.output


def test_untrained_adapter_is_no_effect(reference, tmp_path):
    model = add_lora(load_pretrained(reference / "tiny-llama").model, LoraSettings())
    ckpt = tmp_path / "zero.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in lora_state_dict(model).items()}}, ckpt)
    result = run_cli("merge", "--base-weight", reference / "tiny-llama", "--lora-weight", ckpt,
                     "--output", tmp_path / "out")
    assert result.exit_code == 1 and "LoRA had no effect" in result.output


def test_metadata_mismatch_is_refused(reference, tmp_path):
    ckpt = tmp_path / "lora-ckpt.ckpt"
    ckpt.write_bytes((reference / "lora" / "lora-ckpt.ckpt").read_bytes())
    save_metadata(LoraMetadata(r=8, alpha=16, dropout=0.01, base_sha256="0" * 64), tmp_path)
    result = run_cli("merge", "--base-weight", reference / "tiny-llama", "--lora-weight", ckpt,
                     "--output", tmp_path / "out", "--lora-r", "4")
    assert result.exit_code == 1
    assert "r: adapter has 8, requested 4" in result.output and "base checkpoint" in result.output
    assert sha256_file(reference / "tiny-llama" / "model.pth") != "0" * 64


def test_help_texts():
    for command in ("train", "merge"):
        result = run_cli(command, "--help")
        assert result.exit_code == 0
    help_text = run_cli("train", "--help").output
    for flag in ("--project", "--base", "--data", "--lora", "--resume", "--init-lora", "--save-top-k",
                 "--process-group-backend", "--precision", "--val-fraction"):
        assert flag in help_text
