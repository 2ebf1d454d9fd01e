"""Command-line entry point: `moe-adapt --config=configs/<method>.py:<preset> --workdir=DIR`.

The CLI is thin: it initialises multi-host JAX when asked, checks the workdir
(a rerun of a finished run prints the stored results and does no work; a
workdir holding a different config is refused), and hands the resolved config
to `moe_adapt.methods.<config.method>.run`.
"""

import importlib.util
import json
import sys
import time

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Config file, e.g. configs/meta_dmoe.py:digits_rot.", lock_config=True
)
_WORKDIR = flags.DEFINE_string(
  "workdir", None, "Directory for config, checkpoints and results: local, or gs://bucket/dir."
)
_OVERWRITE = flags.DEFINE_bool(
  "overwrite",
  False,
  "Start over in a workdir that holds another config: its contents are moved to "
  "<workdir>/previous-<time>/ (nothing is deleted).",
)
_DISTRIBUTED = flags.DEFINE_enum(
  "distributed",
  "auto",
  ["auto", "on", "off"],
  "Call jax.distributed.initialize(): 'on' always, 'auto' when the environment shows "
  "a multi-process launch (SLURM, TPU pod, JAX_COORDINATOR_ADDRESS).",
)
flags.mark_flags_as_required(["config", "workdir"])


def _format_results(results: dict) -> str:
  """A compact text table: one row per variant, one column per target domain."""
  lines = []
  for variant, per_domain in results.get("metrics", {}).items():
    cells = [f"{d}={m['accuracy']:.4f}" for d, m in per_domain.items() if "accuracy" in m]
    lines.append(f"  {variant:<24} " + "  ".join(cells))
  return "\n".join(lines)


def run(config, workdir: str, *, overwrite: bool = False) -> dict:
  """Runs (or resumes, or just reports) one config in one workdir; returns results."""
  # Imported here so that `--help` and flag errors stay fast.
  from moe_adapt import methods
  from moe_adapt.train import workdir as workdir_lib
  from moe_adapt.train import workdir_lock

  method = methods.get_method(config.method)
  method.validate_config(config)
  # Data-dependent checks (domains, sizes, files) run before anything is
  # written, so a corrected command can reuse the same workdir.
  setup = method.make_setup(config)
  if not overwrite:
    # Read-only: a finished run, or a workdir of another config, is answered before the
    # lock is taken, so that such a command changes nothing in the workdir.
    stored = workdir_lib.finished_results(workdir, config.to_dict())
    if stored is not None:
      logging.info("%s already holds results; nothing to do.", workdir)
      return stored
  # One process per workdir: a second command on it refuses before it writes anything.
  with workdir_lock.lock(workdir):
    path = workdir_lib.prepare_workdir(workdir, config.to_dict(), overwrite=overwrite)
    stored = workdir_lib.read_results(path)
    if stored is not None:
      logging.info("%s already holds results; nothing to do.", path)
      return stored
    start = time.time()
    results = method.run(config, str(path), setup=setup)
    results["wall_time_s"] = round(time.time() - start, 2)
    import jax

    if jax.process_index() == 0:
      workdir_lib.write_json_atomic(path / "results.json", results)
  return results


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  from moe_adapt.train import loop, mesh

  mesh.initialize_distributed(_DISTRIBUTED.value)
  try:
    results = run(_CONFIG.value, _WORKDIR.value, overwrite=_OVERWRITE.value)
  except ValueError as e:  # Bad input: one clear message, no traceback.
    print(f"moe-adapt: error: {e}", file=sys.stderr)
    sys.exit(2)
  except loop.TrainingDivergedError as e:
    print(f"moe-adapt: training diverged: {e}", file=sys.stderr)
    sys.exit(3)
  print(_format_results(results))
  print(json.dumps(results, sort_keys=True))


def _last_line(error: Exception) -> str:
  # config_flags embeds the config file's traceback or load attempts; the last line is the error.
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  return lines[-1] if lines else repr(error)


def _config_spec(argv: list[str]) -> str | None:
  """The value of `--config` in `argv` (`FILE[:arg]`), or None."""
  spec = None
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      spec = arg.split("=", 1)[1]
    elif arg == "--config" and i + 1 < len(argv):
      spec = argv[i + 1]
  return spec


def _unknown_override(argv: list[str]) -> str | None:
  """The error of the first `--config.<path>=...` whose path names no field of the config."""
  spec = _config_spec(argv)
  try:  # The config as the file builds it, before any override.
    path, *arg = spec.split(":", 1)
    module_spec = importlib.util.spec_from_file_location("_moe_adapt_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    config = module.get_config(*arg)
  except Exception:  # Reported by the caller's generic message.
    return None
  for arg in argv:
    if not arg.startswith("--config."):
      continue
    path = arg.removeprefix("--config.").split("=", 1)[0]
    node, where = config, "the config"
    for part in path.split("."):
      if not isinstance(node, ml_collections.ConfigDict):
        return f"--config.{path} names no field of the config: {where} is not a group of fields"
      if part not in node:
        return (
          f"--config.{path} names no field of the config: {where} has no {part!r}; "
          f"accepted: {', '.join(sorted(node.keys()))}"
        )
      node, where = node[part], part if where == "the config" else f"{where}.{part}"
  return None


def _parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing, with a config-file or override error as one line."""
  try:
    rest = flags.FLAGS(argv)
    if flags.FLAGS["config"].value is not None:
      # config_flags defers a config file's load error to the first access.
      flags.FLAGS["config"].value.get("method")
    return rest
  except flags.Error as e:
    message = _last_line(e)
  except OSError as e:  # The config file could not be loaded.
    name = (_config_spec(argv) or "").split(":", 1)[0]
    message = (
      f"--config={name} cannot be loaded ({_last_line(e)}); accepted: a Python file defining "
      "get_config(arg), e.g. --config=configs/meta_dmoe.py:digits_rot"
    )
  except (AttributeError, KeyError) as e:  # An override naming no field of the config.
    message = _unknown_override(argv) or _last_line(e)
  print(f"moe-adapt: error: {message}", file=sys.stderr)
  sys.exit(2)


def entry_point() -> None:
  """Console script `moe-adapt`."""
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  entry_point()
