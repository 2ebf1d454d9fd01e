"""Launching runs: sweeps (`launch.sweep`), result tables (`launch.collect`) and pod launchers.

Run the Python tools from the repository root:

  python -m launch.sweep launch --config=configs/meta_dmoe.py:digits_rot --sweep_dir=runs/s
  python -m launch.sweep list --sweep_dir=runs/s
  python -m launch.collect --sweep_dir=runs/s

`launch/tpu_pod.sh` and `launch/slurm.sh` start one run on a Cloud TPU slice or a
SLURM allocation (see `docs/sweeps.md`).
"""
