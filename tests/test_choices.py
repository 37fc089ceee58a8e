"""The shared choices name exactly what the core's tables hold."""

from fish_speech_core.choices import CodecDtype, CodecPreset, values
from fish_speech_core.codec.config import PRESETS
from fish_speech_core.codec.extract import DTYPES


def test_codec_choices_match_the_core_tables():
    assert sorted(values(CodecPreset)) == sorted(PRESETS)
    assert sorted(values(CodecDtype)) == sorted(DTYPES)
