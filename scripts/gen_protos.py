"""Regenerate ``fish_speech_core/formats/text_data_pb2.py`` from ``text_data.proto``.

Run from the repository root after editing the .proto (needs the ``test`` extra, grpcio-tools):

    python scripts/gen_protos.py

``tests/formats/test_text_data_proto.py`` fails when the committed module is stale.
"""

from __future__ import annotations

import sys
from pathlib import Path

FORMATS = Path(__file__).resolve().parent.parent / "fish_speech_core" / "formats"


def generate(out_dir: Path) -> Path:
    """Compile text_data.proto into ``out_dir`` with the protoc bundled in grpcio-tools."""
    from grpc_tools import protoc

    args = ["protoc", f"-I{FORMATS}", f"--python_out={out_dir}", str(FORMATS / "text_data.proto")]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    return Path(out_dir) / "text_data_pb2.py"


if __name__ == "__main__":
    print(generate(Path(sys.argv[1]) if len(sys.argv) > 1 else FORMATS))
