"""The run report's small plot: held-out loss and preview similarity vs training step."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from fish_speech_core.files import atomic_path


def _series(rows: Sequence[Mapping], field: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the rows that have ``field``, in step order."""
    points = sorted((int(r["step"]), float(r[field])) for r in rows if r.get(field) is not None)
    return [s for s, _ in points], [v for _, v in points]


def plot_checkpoints(rows: Sequence[Mapping], path: str | Path, dpi: int = 80) -> Path:
    """Draw loss (left axis) and similarity (right axis) vs step into a PNG at ``path``.

    Rows are the evaluate rows: ``step`` plus optional ``val_loss`` and ``similarity`` (None is
    skipped; the base model is step 0, usually with a similarity but no loss), and optional
    ``speakers`` (``[{"speaker", "similarity"}]``), drawn as one thin line per speaker with a
    legend. The same rows give the same bytes: the PNG carries no time or version metadata.

    Raises:
        ValueError: when no row has a step.
    """
    if not rows:
        raise ValueError("plot_checkpoints needs at least one row")
    # Imported here and drawn on an explicit Agg canvas: no pyplot, no backend switch, nothing
    # global touched when fish_speech_core is imported or when this runs inside a GUI process.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.0, 3.2), dpi=dpi)
    FigureCanvasAgg(fig)
    loss_ax = fig.add_subplot(1, 1, 1)
    sim_ax = loss_ax.twinx()
    steps, losses = _series(rows, "val_loss")
    loss_ax.plot(steps, losses, "o-", color="tab:blue", label="held-out loss")
    # per speaker (rows from evaluate_checkpoints carry "speakers"): thin lines under the mean
    speakers = sorted({s["speaker"] for r in rows for s in r.get("speakers") or ()})
    for i, speaker in enumerate(speakers):
        per = [{"step": r["step"], "similarity": s.get("similarity")}
               for r in rows for s in r.get("speakers") or () if s["speaker"] == speaker]
        steps, sims = _series(per, "similarity")
        sim_ax.plot(steps, sims, ".:", color=f"C{(i + 2) % 10}", linewidth=0.8, label=speaker)
    steps, sims = _series(rows, "similarity")
    sim_ax.plot(steps, sims, "s--", color="tab:orange", label="similarity (mean)" if speakers else "speaker similarity")
    if speakers:
        sim_ax.legend(loc="best", fontsize=6, frameon=False)
    loss_ax.set_xlabel("step")
    loss_ax.set_ylabel("held-out loss", color="tab:blue")
    sim_ax.set_ylabel("similarity", color="tab:orange")
    all_steps = sorted({int(r["step"]) for r in rows})
    loss_ax.set_xlim(all_steps[0] - 1, all_steps[-1] + 1)
    loss_ax.grid(True, alpha=0.3)
    fig.suptitle("checkpoints: loss and similarity vs step", fontsize=10)
    fig.tight_layout()
    target = Path(path)
    with atomic_path(target) as tmp:
        # metadata=None entries drop matplotlib's "Software" text chunk: bytes depend on the rows only
        fig.savefig(tmp, format="png", metadata={"Software": None})
    return target
