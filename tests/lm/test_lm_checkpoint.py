import pickle
import shutil
from pathlib import Path

import pytest
import torch

from fish_speech_core.lm import CheckpointError, DualARTransformer, load_pretrained
from fish_speech_core.lm.checkpoint import MODEL_FILE
from fish_speech_core.tokenizer import TOKENIZER_FILES


@pytest.fixture
def tiny(tmp_path, reference) -> Path:
    """A writable copy of the reference tiny-llama folder."""
    folder = tmp_path / "tiny"
    shutil.copytree(reference / "tiny-llama", folder)
    return folder


def weights(folder: Path) -> dict:
    return torch.load(folder / MODEL_FILE, weights_only=True)


def assert_same_state(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key


def forward(model, reference):
    batch = torch.load(reference / "tiny-llama-forward.pt", weights_only=True)
    with torch.no_grad():
        return model.eval()(batch["inputs"], batch["attention_masks"]).token_logits


def test_load_save_load_is_lossless(tmp_path, reference):
    loaded = load_pretrained(reference / "tiny-llama")
    assert loaded.model.tokenizer is loaded.tokenizer and loaded.tokenizer.semantic_id == 5
    out = tmp_path / "saved"
    loaded.model.save_pretrained(out)
    assert sorted(p.name for p in out.iterdir()) == sorted(("config.json", MODEL_FILE, *TOKENIZER_FILES))
    for name in ("config.json", *TOKENIZER_FILES):
        assert (out / name).read_bytes() == (reference / "tiny-llama" / name).read_bytes(), name
    assert_same_state(weights(out), weights(reference / "tiny-llama"))
    again = DualARTransformer.from_pretrained(out)
    assert torch.equal(forward(again, reference), forward(loaded.model, reference))


def test_bfloat16_checkpoint_keeps_its_dtype(tmp_path, tiny):
    state = {k: v.to(torch.bfloat16) for k, v in weights(tiny).items()}
    torch.save(state, tiny / MODEL_FILE)
    model = DualARTransformer.from_pretrained(tiny)
    assert model.embeddings.weight.dtype == torch.bfloat16
    model.save_pretrained(tmp_path / "out")
    assert_same_state(weights(tmp_path / "out"), state)
    as_float = DualARTransformer.from_pretrained(tiny, dtype=torch.float32)
    assert as_float.output.weight.dtype == torch.float32


def test_saving_into_the_source_folder_works(tiny):
    before = weights(tiny)
    DualARTransformer.from_pretrained(tiny).save_pretrained(tiny)
    assert_same_state(weights(tiny), before)
    assert not [p for p in tiny.iterdir() if p.name.startswith(".")]  # no temp files left


def test_lightning_wrapper_and_model_prefix(tiny, reference):
    state = weights(tiny)
    torch.save({"state_dict": {f"model.{k}": v for k, v in state.items()}}, tiny / MODEL_FILE)
    model = DualARTransformer.from_pretrained(tiny)
    assert_same_state(model.state_dict(), state)


def test_separate_wq_wk_wv_are_fused(tiny, reference):
    state = weights(tiny)
    split = {}
    for key, value in state.items():
        if key.endswith("attention.wqkv.weight"):
            prefix = key.removesuffix("wqkv.weight")
            # tiny: 4 query heads and 2 kv heads of 16 -> q 64 rows, k 32, v 32
            q, k, v = value.split([64, 32, 32])
            split |= {f"{prefix}wq.weight": q, f"{prefix}wk.weight": k, f"{prefix}wv.weight": v}
        else:
            split[key] = value
    torch.save(split, tiny / MODEL_FILE)
    model = DualARTransformer.from_pretrained(tiny)
    assert_same_state(model.state_dict(), state)


def test_missing_model_pth(tiny):
    (tiny / MODEL_FILE).unlink()
    with pytest.raises(CheckpointError, match=r"model\.pth not found"):
        DualARTransformer.from_pretrained(tiny)


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="is not a folder"):
        DualARTransformer.from_pretrained(tmp_path / "nope")


class _Touch:
    """Unpickling this would create ``path`` (stands in for arbitrary code)."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("how", ["torch.save", "raw pickle"])
def test_pickle_with_arbitrary_objects_is_refused(tiny, tmp_path, how):
    marker = tmp_path / "marker"
    payload = {"state_dict": {"embeddings.weight": _Touch(marker)}}
    if how == "torch.save":
        torch.save(payload, tiny / MODEL_FILE)
    else:
        (tiny / MODEL_FILE).write_bytes(pickle.dumps(payload))
    # Sanity check of the test itself: a plain unpickle really would create the marker.
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Touch(probe)))
    assert probe.exists()
    with pytest.raises(CheckpointError, match="refusing to load"):
        DualARTransformer.from_pretrained(tiny)
    assert not marker.exists()


def test_wrong_shape_names_the_key(tiny):
    state = weights(tiny)
    state["layers.1.feed_forward.w2.weight"] = torch.zeros(64, 128)
    torch.save(state, tiny / MODEL_FILE)
    with pytest.raises(CheckpointError, match=r"layers\.1\.feed_forward\.w2\.weight has shape \(64, 128\).*\(64, 256\)"):
        DualARTransformer.from_pretrained(tiny)


def test_missing_and_unexpected_keys_are_named(tiny):
    state = weights(tiny)
    del state["fast_norm.weight"]
    state["extra.weight"] = torch.zeros(3)
    torch.save(state, tiny / MODEL_FILE)
    with pytest.raises(CheckpointError, match=r"missing keys \['fast_norm\.weight'\]; unexpected keys \['extra\.weight'\]"):
        DualARTransformer.from_pretrained(tiny)


def test_save_without_tokenizer_is_refused(tmp_path):
    from fish_speech_core.lm import PRESETS

    with pytest.raises(CheckpointError, match="no tokenizer"):
        DualARTransformer(PRESETS["tiny"], 5).save_pretrained(tmp_path)


def test_lora_config_of_the_wrong_type_is_refused(reference):
    with pytest.raises(TypeError, match="LoraSettings"):
        DualARTransformer.from_pretrained(reference / "tiny-llama", lora_config=object())
