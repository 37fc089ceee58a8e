"""`synthesize --lora`: the adapter applied in memory equals the merged folder's weights."""

import pytest
import torch

from fish_speech_core.finetune.lora import LoraSettings, add_lora, lora_parameters, lora_state_dict
from fish_speech_core.finetune.merge import merge_checkpoint
from fish_speech_core.lm import load_pretrained
from fish_speech_core.lm.config import PRESETS
from fish_speech_core.lm.init_base import init_base
from fish_speech_core.synthesis import load_lora_model


def test_lora_applied_in_memory_equals_the_merged_folder(tmp_path):
    init_base(tmp_path / "base", PRESETS["tiny"], seed=0)
    settings = LoraSettings.from_name("r_8_alpha_16")
    model = add_lora(load_pretrained(tmp_path / "base", dtype=torch.float32).model, settings)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in lora_parameters(model):  # B = 0 after init: make the adapter change something
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    ckpt = tmp_path / "lora.ckpt"  # reference layout, no metadata: read as r_8_alpha_16
    torch.save({"state_dict": {f"model.{k}": v for k, v in lora_state_dict(model).items()}}, ckpt)
    merge_checkpoint(tmp_path / "base", ckpt, tmp_path / "merged", settings)

    applied = load_lora_model(tmp_path / "base", ckpt, torch.float32)
    merged = load_pretrained(tmp_path / "merged", dtype=torch.float32).model
    got, want = applied.model.state_dict(), merged.state_dict()
    assert set(got) == set(want)
    base = load_pretrained(tmp_path / "base", dtype=torch.float32).model.state_dict()
    assert any(not torch.equal(want[k], base[k]) for k in want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6)
    assert applied.tokenizer.semantic_id == applied.model.semantic_token_id


def test_lora_for_another_base_is_refused(tmp_path):
    from fish_speech_core.finetune.lora import LoraError, LoraMetadata

    init_base(tmp_path / "base", PRESETS["tiny"], seed=0)
    model = add_lora(load_pretrained(tmp_path / "base", dtype=torch.float32).model, LoraSettings(4, 8.0, 0.0))
    meta = LoraMetadata(r=4, alpha=8.0, dropout=0.0, base_sha256="0" * 64)
    torch.save({"state_dict": lora_state_dict(model), "fishtune_lora": meta.to_dict()}, tmp_path / "a.ckpt")
    with pytest.raises(LoraError, match="base checkpoint"):
        load_lora_model(tmp_path / "base", tmp_path / "a.ckpt", torch.float32)
