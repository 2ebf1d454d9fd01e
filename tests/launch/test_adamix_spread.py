"""`python -m launch.adamix_spread`: one plot of the routing choices of every run."""

import json

from launch import adamix_spread


def _run(seed: int) -> dict:
  return {
    "method": "adamix",
    "benchmark": "vader_sentiment",
    "seed": seed,
    "routing_spread": {"adamix": [0.80 + 0.01 * seed, 0.82]},
    "metrics": {"adamix": {"mean": {"accuracy": 0.81}}, "adapter": {"mean": {"accuracy": 0.83}}},
  }


def test_plots_every_finished_run(tmp_path, capsys):
  for seed in range(2):
    (tmp_path / f"r{seed}").mkdir()
    (tmp_path / f"r{seed}" / "results.json").write_text(json.dumps(_run(seed)))
  (tmp_path / "unfinished").mkdir()
  assert adamix_spread.main([f"--sweep_dir={tmp_path}"]) == 0
  png = tmp_path / "routing_spread.png"
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert "(2 runs)" in capsys.readouterr().out


def test_no_run_is_one_clear_error(tmp_path, capsys):
  assert adamix_spread.main([f"--sweep_dir={tmp_path}"]) == 2
  assert "no finished adamix run" in capsys.readouterr().err
