"""Command-line entry point: `moe-adapt --config=configs/<method>.py:<preset> --workdir=DIR`.

The CLI is thin: it initialises multi-host JAX when asked, checks the workdir
(a rerun of a finished run prints the stored results and does no work; a
workdir holding a different config is refused), and hands the resolved config
to `moe_adapt.methods.<config.method>.run`. `moe-adapt list` lists the methods,
their config presets and the benchmarks; `moe-adapt --help` (or no arguments)
prints the project's own flags with examples.
"""

import ast
import importlib.util
import json
import logging as py_logging
import pathlib
import sys
import textwrap
import time

import ml_collections
from absl import app, flags
from ml_collections import config_flags

from moe_adapt import report

_CONFIG = config_flags.DEFINE_config_file(
  "config",
  None,
  "Config file and its argument: FILE[:PRESET[,tiny]], e.g. configs/meta_dmoe.py:digits_rot "
  "(`moe-adapt list` shows every file and preset; ',tiny' makes a smoke test of a few steps).",
  lock_config=True,
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
_PRINT_JSON = flags.DEFINE_bool(
  "print_json",
  False,
  "After the results table, print the whole results.json as one JSON line (the last line "
  "of stdout), for scripts.",
)
flags.mark_flags_as_required(["config", "workdir"])

# The project's own flags, in the order `--help` shows them.
_OWN_FLAGS = (_CONFIG, _WORKDIR, _OVERWRITE, _DISTRIBUTED, _PRINT_JSON)
_HELP_ARGS = ("--help", "-help", "-h", "--helpshort", "-helpshort", "help")

_USAGE = """\
moe-adapt: adapt a model to a new domain or task by reusing several experts
(Meta-DMoE, Co-Tuning, adapter soups, MUKA/MUKI, AdaMix).

Usage:
  moe-adapt --config=FILE[:PRESET[,tiny]] --workdir=DIR [--config.FIELD=VALUE ...]
  moe-adapt list      the methods, their config files and presets, and the benchmarks
  moe-adapt --help    this help (--helpfull: also every flag of absl and JAX)
"""

_EXAMPLES = """\
Examples (run from the repository root, where configs/ is):
  # The main job: Meta-DMoE on rotated digits (~1.5 min on 2 quiet CPU cores).
  moe-adapt --config=configs/meta_dmoe.py:digits_rot --workdir=runs/meta_dmoe_digits
  # A smoke test of the same pipeline (a few steps per stage; chance-level numbers).
  moe-adapt --config=configs/meta_dmoe.py:digits_rot,tiny --workdir=/tmp/smoke
  # Another seed and target domain: any config field can be overridden.
  moe-adapt --config=configs/meta_dmoe.py:digits_rot --workdir=runs/mdmoe_s1 \\
    --config.seed=1 --config.data.target_domains="('rot0',)"

A run writes DIR/config.json, metrics.jsonl, checkpoints/ and, at the end, results.json,
then prints a results table. Rerunning a finished command prints the stored results and
does no work; rerunning an interrupted one resumes from its last checkpoint.
Exit status: 0 done (also for --help and list), 2 bad input or no arguments (after this
help), 3 training diverged.
"""


def help_text() -> str:
  """The text of `moe-adapt --help`: usage, the project's own flags, examples."""
  lines = [_USAGE, "Flags:"]
  for holder in _OWN_FLAGS:
    flag = flags.FLAGS[holder.name]
    if flag.boolean:
      name = f"--[no]{flag.name}"
    elif flag.name == "config":
      name = "--config=FILE[:ARG]"
    else:
      values = getattr(flag.parser, "enum_values", None)
      name = f"--{flag.name}=" + ("|".join(values) if values else "DIR")
    default = "" if flag.default in (None, False) else f" (default: {flag.default})"
    # absl prefixes an enum's help with its values, which the name above already shows.
    lines.append(f"  {name}")
    text = flag.help.split(">: ", 1)[1] if flag.help.startswith("<") else flag.help
    lines.extend(
      textwrap.wrap(text + default, 92, initial_indent=" " * 6, subsequent_indent=" " * 6)
    )
  lines.append("  --config.FIELD=VALUE")
  lines.extend(
    textwrap.wrap(
      "Override one field of the config, e.g. --config.seed=1, --config.train.steps=50; "
      "an unknown field is refused with the accepted ones listed.",
      92,
      initial_indent=" " * 6,
      subsequent_indent=" " * 6,
    )
  )
  return "\n".join(lines) + "\n\n" + _EXAMPLES


# ----------------------------------------------------------------------------- moe-adapt list

# One line per built-in benchmark (a benchmark registered from outside shows its docstring).
_BENCHMARK_LINES = {
  "digits_rot": "scikit-learn digits, 6 rotation domains (rot0..rot75), 16x16; no download",
  "fmnist_rot": "Fashion-MNIST, 6 rotation domains, 28x28; apt-get install dataset-fashion-mnist",
  "fmnist_shift": "Fashion-MNIST, 22 geometry x appearance domains, 5 held out; as fmnist_rot",
  "tfds": "your own TFDS dataset (array_record) with a domain feature",
  "vader_sentiment": "VADER sentiment, 4 text domains; moe-adapt-data fetch vader_sentiment",
  "tweets_topics": "tweets, 6 topic domains, 3 classes; moe-adapt-data fetch tweets_topics",
  "newsgroups": "20 Newsgroups, 20 classes; moe-adapt-data fetch newsgroups",
  "embedded": "a text benchmark as frozen MiniLM sentence embeddings (MUKA's text heads)",
}


def _configs_dir() -> pathlib.Path | None:
  """`configs/` of the current directory, else of the checkout the package runs from."""
  for root in (pathlib.Path.cwd(), pathlib.Path(__file__).resolve().parents[1]):
    if (root / "configs").is_dir():
      return root / "configs"
  return None


def _load_config_module(path: pathlib.Path):
  spec = importlib.util.spec_from_file_location(f"_moe_adapt_config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _config_presets(path: pathlib.Path) -> tuple[str, tuple[str, ...], tuple[str, ...]]:
  """(method, presets, flags) of a config file; presets as its own error lists them."""
  from moe_adapt import config_presets

  module = _load_config_module(path)
  method = module.get_config().method
  try:
    module.get_config("?")  # No preset is called '?': the error carries the accepted ones.
  except config_presets.UnknownPresetError as e:
    return method, e.presets, e.flags
  return method, (), ()


def _first_doc_line(module_name: str) -> str:
  """The first docstring line of a module, read without importing it (no JAX start-up)."""
  spec = importlib.util.find_spec(module_name)
  source = pathlib.Path(spec.origin).read_text(encoding="utf-8")
  doc = ast.get_docstring(ast.parse(source)) or ""
  return doc.strip().splitlines()[0] if doc.strip() else ""


def list_text() -> str:
  """The text of `moe-adapt list`: methods, config files with presets, benchmarks."""
  from moe_adapt import methods, recipes  # noqa: F401  (recipes: registers them)
  from moe_adapt.data import registry

  out = ["Methods (config.method):"]
  names = methods.list_methods()
  width = max(len(n) for n in names) + 2
  for name in names:
    out.append(f"  {name:<{width}}{_first_doc_line(methods._METHODS[name])}")
  configs = _configs_dir()
  out.append("")
  if configs is None:
    out.append("Config files: no configs/ folder here; run from the repository root.")
  else:
    out.append(
      "Config files and presets (--config=FILE:PRESET; the first preset is the default; "
      "append ',tiny' for a smoke test):"
    )
    # Paths as --config takes them from here: relative when configs/ is in this folder.
    root = configs.parent if configs.parent == pathlib.Path.cwd() else None
    for path in sorted(configs.rglob("*.py")):
      if path.name.startswith("_"):
        continue
      method, presets, extra = _config_presets(path)
      flag_text = f"  [flags: {', '.join(extra)}]" if extra else ""
      out.append(
        f"  {path.relative_to(root) if root else path!s:<36}{', '.join(presets) or '(no presets)'}"
        f"  -> {method}{flag_text}"
      )
  out.append("")
  out.append("Benchmarks (config.data.benchmark):")
  names = registry.list_benchmarks()
  width = max(len(n) for n in names) + 2
  for name in names:
    line = _BENCHMARK_LINES.get(name)
    if line is None:
      doc = (registry._REGISTRY[name].__doc__ or "").strip()
      line = doc.splitlines()[0] if doc else ""
    out.append(f"  {name:<{width}}{line}")
  return "\n".join(out) + "\n"


def _announce(message: str) -> None:
  """One progress line on stderr (not a log record: no level, time or source prefix)."""
  print(f"moe-adapt: {message}", file=sys.stderr, flush=True)


def run(config, workdir: str, *, overwrite: bool = False, smoke_test: bool = False) -> dict:
  """Runs (or resumes, or just reports) one config in one workdir; returns results.

  `smoke_test` (a `,tiny` config) adds a line saying that the numbers will mean nothing.
  """
  # Imported here so that `--help` and flag errors stay fast.
  from moe_adapt import methods, recipes  # noqa: F401  (recipes: registers them)
  from moe_adapt.train import workdir as workdir_lib
  from moe_adapt.train import workdir_lock

  method = methods.get_method(config.method)
  method.validate_config(config)
  if smoke_test:
    _announce(_SMOKE_NOTE)
  benchmark = config.get("data", {}).get("benchmark", "")
  _announce(f"{config.method}{f' on {benchmark}' if benchmark else ''}: loading data")
  # Data-dependent checks (domains, sizes, files) run before anything is
  # written, so a corrected command can reuse the same workdir.
  setup = method.make_setup(config)
  if not overwrite:
    # Read-only: a finished run, or a workdir of another config, is answered before the
    # lock is taken, so that such a command changes nothing in the workdir.
    stored = workdir_lib.finished_results(workdir, config.to_dict())
    if stored is not None:
      _announce(f"{workdir} already holds results; nothing to do.")
      return stored
  # One process per workdir: a second command on it refuses before it writes anything.
  with workdir_lock.lock(workdir):
    path = workdir_lib.prepare_workdir(workdir, config.to_dict(), overwrite=overwrite)
    stored = workdir_lib.read_results(path)
    if stored is not None:
      _announce(f"{path} already holds results; nothing to do.")
      return stored
    _announce(f"training; workdir {path}")
    start = time.time()
    results = method.run(config, str(path), setup=setup)
    results["wall_time_s"] = round(time.time() - start, 2)
    import jax

    if jax.process_index() == 0:
      workdir_lib.write_json_atomic(path / "results.json", results)
  return results


class _NoMissingBackendInfo(py_logging.Filter):
  """Drops JAX's INFO lines about accelerator backends that are absent (e.g. TPU on a CPU)."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    return not (
      record.levelno <= py_logging.INFO and "Unable to initialize backend" in record.getMessage()
    )


def _is_smoke_test(argv: list[str]) -> bool:
  """Whether `--config=FILE:ARG` asks for the `tiny` flag of a preset."""
  spec = _config_spec(argv) or ""
  return "tiny" in spec.partition(":")[2].split(",")[1:]


_SMOKE_NOTE = (
  "note: a ',tiny' config is a smoke test: a few steps per stage on tiny models, so "
  "accuracies near chance are expected. Drop ',tiny' for real numbers."
)


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  py_logging.getLogger("jax._src.xla_bridge").addFilter(_NoMissingBackendInfo())
  from moe_adapt.train import loop, mesh

  smoke = _is_smoke_test(sys.argv)
  mesh.initialize_distributed(_DISTRIBUTED.value)
  try:
    results = run(_CONFIG.value, _WORKDIR.value, overwrite=_OVERWRITE.value, smoke_test=smoke)
  except ValueError as e:  # Bad input: one clear message, no traceback.
    print(f"moe-adapt: error: {e}", file=sys.stderr)
    sys.exit(2)
  except loop.TrainingDivergedError as e:
    print(f"moe-adapt: training diverged: {e}", file=sys.stderr)
    sys.exit(3)
  results_path = f"{_WORKDIR.value.rstrip('/')}/results.json"
  print(report.format_results(results, results_path=results_path, smoke_test=smoke))
  if _PRINT_JSON.value:
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
  """Console script `moe-adapt`: a run, `list`, or the help."""
  args = sys.argv[1:]
  if not args:  # The short help; exit 2 because a run needs --config and --workdir.
    print(help_text())
    sys.exit(2)
  if any(arg in _HELP_ARGS for arg in args):
    print(help_text())
    sys.exit(0)
  if args == ["list"]:
    print(list_text(), end="")
    sys.exit(0)
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  entry_point()
