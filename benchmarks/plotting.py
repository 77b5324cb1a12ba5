"""One plot shape the kernel benchmarks share: time against sequence length on log-log axes, one panel per mode."""

from __future__ import annotations

import traceback


def time_vs_length(path, panels, title, xlabel="sequence length"):
  """``panels``: {panel title: {line label: [(length, ms), ...]}}; empty lines are skipped. Writes a PNG to ``path``;
  a plotting failure is printed, never raised (the measurements matter more than the picture)."""
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, (name, lines) in zip(axes[0], panels.items()):
      for label, pts in lines.items():
        if pts:
          ax.plot(*zip(*sorted(pts)), marker="o", label=label)
      ax.set_xscale("log", base=2)
      ax.set_yscale("log")
      ax.set_xlabel(xlabel)
      ax.set_ylabel("ms")
      ax.set_title(name, fontsize=10)
      ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
  except Exception:  # noqa: BLE001
    traceback.print_exc()
