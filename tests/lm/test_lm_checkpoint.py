import pickle
import shutil
from pathlib import Path

import pytest
import torch

from fish_speech_core.lm import CheckpointError, DualARTransformer, load_pretrained, save_pretrained
from fish_speech_core.lm.checkpoint import MODEL_FILE
from fish_speech_core.tokenizer import TOKENIZER_FILES, FishTokenizer
from fish_speech_core.weights import WeightsError


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
    assert not hasattr(loaded.model, "tokenizer") and loaded.tokenizer.semantic_id == 5  # a pure model
    out = tmp_path / "saved"
    save_pretrained(loaded.model, out, loaded.tokenizer)
    assert sorted(p.name for p in out.iterdir()) == sorted(("config.json", MODEL_FILE, *TOKENIZER_FILES))
    for name in ("config.json", *TOKENIZER_FILES):
        assert (out / name).read_bytes() == (reference / "tiny-llama" / name).read_bytes(), name
    assert_same_state(weights(out), weights(reference / "tiny-llama"))
    again = load_pretrained(out).model
    assert torch.equal(forward(again, reference), forward(loaded.model, reference))


def test_bfloat16_checkpoint_keeps_its_dtype(tmp_path, tiny):
    state = {k: v.to(torch.bfloat16) for k, v in weights(tiny).items()}
    torch.save(state, tiny / MODEL_FILE)
    loaded = load_pretrained(tiny)
    assert loaded.model.embeddings.weight.dtype == torch.bfloat16
    save_pretrained(loaded.model, tmp_path / "out", loaded.tokenizer)
    assert_same_state(weights(tmp_path / "out"), state)
    as_float = load_pretrained(tiny, dtype=torch.float32).model
    assert as_float.output.weight.dtype == torch.float32


def test_saving_into_the_source_folder_works(tiny):
    before = weights(tiny)
    loaded = load_pretrained(tiny)
    save_pretrained(loaded.model, tiny, loaded.tokenizer)
    assert_same_state(weights(tiny), before)
    assert not [p for p in tiny.iterdir() if p.name.startswith(".")]  # no temp files left


def test_lightning_wrapper_and_model_prefix(tiny, reference):
    state = weights(tiny)
    torch.save({"state_dict": {f"model.{k}": v for k, v in state.items()}}, tiny / MODEL_FILE)
    model = load_pretrained(tiny).model
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
    model = load_pretrained(tiny).model
    assert_same_state(model.state_dict(), state)


def test_missing_model_pth(tiny):
    (tiny / MODEL_FILE).unlink()
    with pytest.raises(CheckpointError, match=r"model\.pth not found"):
        load_pretrained(tiny)


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="is not a folder"):
        load_pretrained(tmp_path / "nope")


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
    with pytest.raises(WeightsError, match="refusing to load"):
        load_pretrained(tiny)
    assert not marker.exists()


def test_wrong_shape_names_the_key(tiny):
    state = weights(tiny)
    state["layers.1.feed_forward.w2.weight"] = torch.zeros(64, 128)
    torch.save(state, tiny / MODEL_FILE)
    with pytest.raises(CheckpointError, match=r"layers\.1\.feed_forward\.w2\.weight has shape \(64, 128\).*\(64, 256\)"):
        load_pretrained(tiny)


def test_missing_and_unexpected_keys_are_named(tiny):
    state = weights(tiny)
    del state["fast_norm.weight"]
    state["extra.weight"] = torch.zeros(3)
    torch.save(state, tiny / MODEL_FILE)
    with pytest.raises(CheckpointError, match=r"missing keys \['fast_norm\.weight'\]; unexpected keys \['extra\.weight'\]"):
        load_pretrained(tiny)


def test_save_with_a_tokenizer_of_another_semantic_id_is_refused(tmp_path, reference):
    from fish_speech_core.lm import PRESETS

    tokenizer = FishTokenizer.from_dir(reference / "tiny-llama")  # <|semantic|> is id 5
    with pytest.raises(CheckpointError, match=r"<\|semantic\|> id 5 differs from the model's semantic_token_id 6"):
        save_pretrained(DualARTransformer(PRESETS["tiny"], 6), tmp_path, tokenizer)
    assert not any(tmp_path.iterdir())
