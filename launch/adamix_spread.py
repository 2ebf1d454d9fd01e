r"""AdaMix's Figure-5 plot over a sweep: single random-routing choices vs the merged model.

  python -m launch.adamix_spread --sweep_dir=runs/adamix/vader [--out=FILE.png]

Reads every finished run's results.json under `--sweep_dir` (runs of `configs/adamix.py`)
and draws all their routing choices and merged accuracies in one violin/strip plot
(`moe_adapt.methods.adamix.plot_routing_spread`); default output
`<sweep_dir>/routing_spread.png`.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from collections.abc import Sequence

from moe_adapt.methods import adamix


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m launch.adamix_spread")
  parser.add_argument("--sweep_dir", required=True)
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  paths = sorted(pathlib.Path(args.sweep_dir).glob("*/results.json"))
  runs = [json.loads(p.read_text()) for p in paths]
  runs = [r for r in runs if r.get("method") == "adamix" and r.get("routing_spread")]
  if not runs:
    print(
      f"launch.adamix_spread: error: no finished adamix run with a routing spread under "
      f"--sweep_dir={args.sweep_dir}",
      file=sys.stderr,
    )
    return 2
  out = args.out or str(pathlib.Path(args.sweep_dir) / "routing_spread.png")
  adamix.plot_routing_spread(runs, out)
  print(f"wrote {out} ({len(runs)} runs)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
