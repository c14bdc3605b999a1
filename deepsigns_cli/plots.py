"""Figures (matplotlib, imported only here and only when a figure is asked for)."""

from __future__ import annotations

import io
import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .results import SweepReport

__all__ = ["sweep_plot"]

_P_FLOOR = 1e-300  # -log10 of a p-value that underflowed to 0


def _evidence(p: float) -> float:
    return -math.log10(max(p, _P_FLOOR))


def sweep_plot(report: SweepReport) -> bytes:
    """Accuracy and each watermark's evidence (-log10 p, extract's reading) against the attack's
    strength, in one figure (a PNG file's bytes); the victim's accuracy, the literature's
    "removed" line (5 points below it) and alpha (each mark's share of it) drawn across."""
    import logging

    # (where HOME cannot be written, matplotlib logs two lines on stderr as it makes a temporary
    # cache folder, which it removes at exit: a report or one error line is all a command prints)
    logging.getLogger("matplotlib").setLevel(logging.ERROR)
    import matplotlib

    matplotlib.use("Agg")  # files only, never a screen
    import matplotlib.pyplot as plt

    victim, attacked = report.rows[0], report.rows[1:]
    numeric = all(isinstance(r.value, (int, float)) for r in attacked)
    xs = [r.value for r in attacked] if numeric else list(range(len(attacked)))
    fig, acc_ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    acc_ax.plot(xs, [r.accuracy for r in attacked], "o-", color="black", label="test accuracy")
    acc_ax.axhline(victim.accuracy, color="black", lw=0.8, ls="--", label="victim's accuracy")
    acc_ax.axhline(victim.accuracy - 5, color="grey", lw=0.8, ls=":", label="5 points below")
    acc_ax.set_xlabel(f"{report.attack}: {report.param.replace('_', '-')}")
    acc_ax.set_ylabel("test accuracy (%)")
    if not numeric:
        acc_ax.set_xticks(xs, [str(r.value) for r in attacked])
    ev_ax = acc_ax.twinx()
    schemes = [res.scheme for res in victim.extract.results]
    for i, scheme in enumerate(schemes):
        ys = [_evidence(next(x.p_value for x in r.extract.results if x.scheme == scheme)) for r in attacked]
        ev_ax.plot(xs, ys, "s-", color=f"C{i}", label=f"{scheme} mark: -log10 p")
    # (each mark is detected at its share of alpha: results.decide)
    share = report.alpha / max(1, len(schemes))
    ev_ax.axhline(_evidence(share), color="C3", lw=0.8, ls="--",
                  label=f"alpha = {report.alpha:g}" + (f" / {len(schemes)} marks" if len(schemes) > 1 else ""))
    ev_ax.set_ylabel("evidence of the owner's mark (-log10 p)")
    ev_ax.set_ylim(bottom=0)
    handles = acc_ax.get_legend_handles_labels()
    more = ev_ax.get_legend_handles_labels()
    acc_ax.legend(handles[0] + more[0], handles[1] + more[1], fontsize=7, loc="lower left")
    acc_ax.set_title(f"deepsigns attack {report.attack}: what the owner's keys still read", fontsize=9)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png")
    plt.close(fig)
    return png.getvalue()
