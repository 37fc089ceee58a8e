import importlib.util
from pathlib import Path

from google.protobuf.descriptor import FieldDescriptor as FD

from fish_speech_core.formats import text_data_pb2

ROOT = Path(__file__).resolve().parents[2]


def _generator():
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "scripts" / "gen_protos.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_module_equals_a_fresh_protoc_run(tmp_path):
    fresh = _generator().generate(tmp_path)
    committed = ROOT / "fish_speech_core" / "formats" / "text_data_pb2.py"
    assert fresh.read_bytes() == committed.read_bytes(), "run: python scripts/gen_protos.py"


def test_schema_matches_the_readme_table():
    fields = {
        (message.name, f.name): (f.number, f.type, f.is_repeated)
        for message in text_data_pb2.DESCRIPTOR.message_types_by_name.values()
        for f in message.fields
    }
    repeated, optional = True, False
    assert text_data_pb2.DESCRIPTOR.package == "text_data"
    assert fields == {
        ("Semantics", "values"): (1, FD.TYPE_UINT32, repeated),
        ("Sentence", "texts"): (1, FD.TYPE_STRING, repeated),
        ("Sentence", "semantics"): (3, FD.TYPE_MESSAGE, repeated),
        ("TextData", "source"): (1, FD.TYPE_STRING, optional),
        ("TextData", "name"): (2, FD.TYPE_STRING, optional),
        ("TextData", "sentences"): (4, FD.TYPE_MESSAGE, repeated),
    }
