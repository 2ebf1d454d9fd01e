"""The adapter soup's figures (written to `<workdir>/plots/`, local or remote)."""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence

import numpy as np

from moe_adapt.train import workdir as workdir_lib

PLOTS_DIR = "plots"
PLOT_FILES = ("fsd_accuracy.png", "fsd_matrix.png", "sparsity.png", "greedy.png")


def _pyplot():
  import matplotlib  # Deferred: only plotting needs it.

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


def _save(fig, path: str | os.PathLike) -> None:
  """Writes `fig` as a PNG to `path` (local or remote, e.g. `gs://`), replaced in one step."""
  plt = _pyplot()
  fig.tight_layout()
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")  # legends outside the axes too
  plt.close(fig)
  workdir_lib.write_bytes_atomic(path, buffer.getvalue())


def _area(size: int) -> float:
  """Marker area of a mixture of `size` adapters."""
  return 12 + 6 * size


def _correlation_title(correlations: Mapping[str, Mapping], seed: int | None) -> str:
  """The run's seed and the Spearman correlation within the smallest size (with its
  bootstrap interval) and pooled given the size."""

  def fmt(v):
    return "n/a" if v is None else f"{v:.2f}"

  def ci(v):
    return "" if v is None else f" [{v[0]:.2f}, {v[1]:.2f}]"

  run = "" if seed is None else f"seed {seed}: "
  parts = []
  sizes = sorted(int(name[5:]) for name in correlations if name.startswith("size_"))
  for name in ([f"size_{sizes[0]}"] if sizes else []) + ["pooled_given_size"]:
    c = correlations.get(name)
    if c:
      label = name.replace("_", " ").replace("size ", "k = ")
      parts.append(f"{label}: Spearman {fmt(c.get('spearman'))}{ci(c.get('spearman_ci'))}")
  return run + "; ".join(parts)


def plot_fsd_accuracy(
  path: str | os.PathLike,
  mixtures: Sequence[Mapping],
  correlations: Mapping[str, Mapping],
  *,
  seed: int | None = None,
) -> None:
  """Scatter of FSD vs accuracy − own accuracy, mixtures of size >= 2, one colour per domain.

  Marker area grows with the mixture's size (number of adapters), shown in a second legend;
  the title names the seed of the run and the correlation within the smallest size (k = 2,
  the paper's) with its bootstrap interval, or pooled given the size when several sizes.
  """
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(7.2, 4.5))

  domains = list(dict.fromkeys(m["domain"] for m in mixtures))
  for d in domains:
    pts = [m for m in mixtures if m["domain"] == d and m["size"] >= 2]
    ax.scatter(
      [100 * m["fsd"] for m in pts],
      [100 * m["accuracy_delta"] for m in pts],
      s=[_area(m["size"]) for m in pts],
      alpha=0.7,
      label=d,
    )
  ax.axhline(0.0, color="gray", lw=0.8)
  ax.set_xlabel("FSD of the mixture (%)")
  ax.set_ylabel("accuracy − own adapter's (points)")

  ax.set_title(_correlation_title(correlations, seed), fontsize=9)
  if domains:
    # Two legends outside the axes: colour = domain, marker size = adapters in the mixture.
    colours = ax.legend(
      title="domain", fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0
    )
    ax.add_artist(colours)
    sizes = sorted({m["size"] for m in mixtures if m["size"] >= 2})
    handles = [ax.scatter([], [], s=_area(k), color="gray", alpha=0.7, label=str(k)) for k in sizes]
    ax.legend(
      handles=handles,
      title="adapters mixed",
      fontsize=7,
      loc="lower left",
      bbox_to_anchor=(1.02, 0.0),
      borderaxespad=0,
    )
  _save(fig, path)


def plot_fsd_matrix(path: str | os.PathLike, matrix: np.ndarray, names: Sequence[str]) -> None:
  """The [K, K] pairwise FSD matrix as an annotated heat map (percent)."""
  plt = _pyplot()
  k = len(names)
  fig, ax = plt.subplots(figsize=(1.6 + 0.8 * k, 1.2 + 0.7 * k))
  image = ax.imshow(100 * matrix, cmap="magma", vmin=0.0, vmax=50.0)
  ax.set_xticks(range(k), names, rotation=45, ha="right")
  ax.set_yticks(range(k), names)
  if k <= 20:
    for i in range(k):
      for j in range(k):
        ax.text(j, i, f"{100 * matrix[i, j]:.1f}", ha="center", va="center", fontsize=7,
                color="black" if matrix[i, j] > 0.3 else "white")  # fmt: skip
  ax.set_title("pairwise FSD of the adapters (%)")
  fig.colorbar(image, ax=ax, label="FSD (%)")
  _save(fig, path)


def plot_lines(
  path: str | os.PathLike,
  x_label: str,
  curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
  *,
  title: str,
) -> None:
  """Accuracy lines: curve name -> (x values, accuracies)."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(6.0, 4.2))
  for name, (xs, ys) in curves.items():
    ax.plot(xs, [100 * y for y in ys], marker="o", label=name)
  ax.set_xlabel(x_label)
  ax.set_ylabel("accuracy (%)")
  ax.set_title(title)
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
  _save(fig, path)


# ----------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------


def greedy_curves(config, study: dict, study_domains, k: int) -> dict:
  """Greedy mixing against the empirical best/mean/min per size, averaged over domains."""
  sizes = list(range(1, k + 1))
  own = float(np.mean([study["summary"][d]["own"] for d in study_domains]))
  curves = {
    f"greedy ({config.study.greedy_rank})": (
      sizes,
      [study["metrics"][f"greedy_{size}"]["mean"]["accuracy"] for size in sizes],
    )
  }
  for stat in ("best", "mean", "min"):
    ys = [own]
    for size in sizes[1:]:
      vals = [
        study["summary"][d]["sizes"][str(size)][stat]
        for d in study_domains
        if str(size) in study["summary"][d]["sizes"]
      ]
      ys.append(float(np.mean(vals)) if vals else float("nan"))
    curves[f"empirical {stat}"] = (sizes, ys)
  return curves


def save_plots(
  plots, config, study: dict, pruning: dict, adapters: Sequence[str], study_domains
) -> None:
  """The four figures of a run (PLOT_FILES) into the directory `plots` (created)."""
  plots.mkdir(parents=True, exist_ok=True)
  plot_fsd_accuracy(
    plots / "fsd_accuracy.png", study["mixtures"], study["correlations"]["fsd"], seed=config.seed
  )
  plot_fsd_matrix(plots / "fsd_matrix.png", study["fsd_matrix"], adapters)
  if pruning["curves"]:
    plot_lines(
      plots / "sparsity.png", "sparsity", pruning["curves"], title="pruning before averaging"
    )
  plot_lines(
    plots / "greedy.png",
    "mixture size l",
    greedy_curves(config, study, study_domains, len(adapters)),
    title="greedy adapter mixing (in-domain)",
  )
