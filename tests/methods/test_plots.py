"""Figures drawn by the methods: legends that cover no data, the marker-size legend, the seed."""

import numpy as np
import pytest

from moe_adapt.methods import adamix, soup_plots


@pytest.fixture
def figures(monkeypatch):
  """The figures the plot functions save, kept open for inspection."""
  import matplotlib.pyplot as plt

  saved = []
  monkeypatch.setattr(plt, "close", lambda fig=None: saved.append(fig))
  yield saved
  monkeypatch.undo()
  plt.close("all")


def _legend_outside_axes(fig, legend) -> bool:
  fig.canvas.draw()
  box = legend.get_window_extent()
  axes = legend.axes.get_window_extent()
  return box.x0 >= axes.x1


def test_routing_spread_legend_sits_outside_the_axes(tmp_path, figures):
  rng = np.random.default_rng(0)
  runs = [
    {
      "benchmark": "vader_sentiment",
      "routing_spread": {"adamix": list(0.82 + 0.02 * rng.random(15))},
      "metrics": {"adamix": {"mean": {"accuracy": 0.85}}, "adapter": {"mean": {"accuracy": 0.84}}},
    }
  ]
  adamix.plot_routing_spread(runs, tmp_path / "spread.png")
  assert (tmp_path / "spread.png").stat().st_size > 0
  (fig,) = figures
  (ax,) = fig.axes
  assert _legend_outside_axes(fig, ax.get_legend())


def test_fsd_scatter_has_a_size_legend_and_the_seed(tmp_path, figures):
  mixtures = [
    {"domain": d, "size": k, "fsd": 0.1 * k + 0.01 * i, "accuracy_delta": 0.01 * (i - k)}
    for i, d in enumerate(["tweets", "movies"])
    for k in (1, 2, 3)
  ]
  soup_plots.plot_fsd_accuracy(
    tmp_path / "fsd.png",
    mixtures,
    {"size_2": {"spearman": 0.5, "spearman_ci": [0.1, 0.9]}, "pooled_given_size": {}},
    seed=2,
  )
  (fig,) = figures
  (ax,) = fig.axes
  assert ax.get_title() == "seed 2: k = 2: Spearman 0.50 [0.10, 0.90]"
  legends = [a for a in ax.get_children() if type(a).__name__ == "Legend"]
  titles = {leg.get_title().get_text(): leg for leg in legends}
  assert set(titles) == {"domain", "adapters mixed"}
  assert [t.get_text() for t in titles["adapters mixed"].get_texts()] == ["2", "3"]
  assert [t.get_text() for t in titles["domain"].get_texts()] == ["tweets", "movies"]
  assert all(_legend_outside_axes(fig, leg) for leg in legends)
