"""Training presets: exactly the fields each sets, every one a valid TrainConfig."""

import pytest

from fish_speech_core.finetune.module import TrainConfig
from fish_speech_core.finetune.presets import PRESETS, preset_settings


def test_presets_set_exactly_these_fields():
    assert list(PRESETS) == ["tiny", "small", "large"]
    assert preset_settings("tiny") == dict(lora_r=4, lora_alpha=8.0, batch_size=2, max_length=256, val_check_interval=10,
                                           lr=1e-3, warmup_steps=2, val_fraction=0.2, val_batch_size=4)
    assert preset_settings("small") == dict(lora_r=8, lora_alpha=16.0, batch_size=8, max_length=4096, val_check_interval=100, lr=1e-4)
    assert preset_settings("large") == dict(lora_r=32, lora_alpha=64.0, batch_size=8, max_length=4096, val_check_interval=100, lr=1e-4)
    small = preset_settings("small")
    small["lr"] = 1.0
    assert preset_settings("small")["lr"] == 1e-4  # a copy: callers cannot change the preset


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_is_a_valid_train_config(name):
    assert TrainConfig(project="p", base="b", data=("d",), **preset_settings(name)).validate() == []


def test_an_unknown_preset_names_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown training preset 'huge'; choose one of \['tiny', 'small', 'large'\]"):
        preset_settings("huge")
