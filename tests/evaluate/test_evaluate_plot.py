"""The run report's checkpoint plot: a real PNG, deterministic, and it depends on the data."""

import struct
import sys

from fish_speech_core.evaluate.plot import plot_checkpoints

ROWS = [
    {"name": "base", "step": 0, "similarity": 0.61, "val_loss": None},
    {"name": "step_10", "step": 10, "similarity": 0.70, "val_loss": 3.2},
    {"name": "step_20", "step": 20, "similarity": 0.78, "val_loss": 2.9},
    {"name": "step_30", "step": 30, "similarity": None, "val_loss": 2.8},  # not scored: skipped in that line
]


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_plot_writes_a_png_of_sane_size(tmp_path):
    out = plot_checkpoints(ROWS, tmp_path / "sub" / "plot.png")
    assert out == tmp_path / "sub" / "plot.png"
    data = out.read_bytes()
    width, height = _png_size(data)
    assert (width, height) == (480, 256)  # 6 x 3.2 inches at 80 dpi
    assert b"Software" not in data  # no version metadata: bytes depend on the rows only
    assert [p.name for p in out.parent.iterdir()] == ["plot.png"]  # atomic: no temp file left


def test_plot_is_deterministic_and_encodes_the_data(tmp_path):
    a = plot_checkpoints(ROWS, tmp_path / "a.png").read_bytes()
    again = plot_checkpoints(list(reversed(ROWS)), tmp_path / "again.png").read_bytes()  # row order does not matter
    changed = [dict(r) for r in ROWS]
    changed[2]["val_loss"] = 2.1
    b = plot_checkpoints(changed, tmp_path / "b.png").read_bytes()
    assert a == again
    assert a != b


def test_plot_leaves_no_global_matplotlib_state(tmp_path):
    # pyplot (the stateful interface) is never imported, so no backend was chosen for the process
    before = "matplotlib.pyplot" in sys.modules
    plot_checkpoints(ROWS[:1], tmp_path / "one.png")
    assert ("matplotlib.pyplot" in sys.modules) == before


def test_plot_draws_a_line_per_speaker_when_rows_have_them(tmp_path):
    def with_speakers(sims):
        return [{**r, "speakers": [{"speaker": "alice", "similarity": sims[i]}, {"speaker": "bruno", "similarity": 0.5}]}
                for i, r in enumerate(ROWS)]

    plain = plot_checkpoints(ROWS, tmp_path / "plain.png").read_bytes()
    a = plot_checkpoints(with_speakers([0.6, 0.7, 0.8, None]), tmp_path / "a.png").read_bytes()
    b = plot_checkpoints(with_speakers([0.6, 0.7, 0.9, None]), tmp_path / "b.png").read_bytes()
    assert _png_size(a) == (480, 256)
    assert a != plain and a != b  # one speaker's similarity changed: another picture
    assert plot_checkpoints(with_speakers([0.6, 0.7, 0.8, None]), tmp_path / "again.png").read_bytes() == a
