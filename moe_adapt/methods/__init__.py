"""Methods: one module per paper, each exposing `run(config, workdir) -> results`.

The recipes (`moe_adapt.recipes`) register themselves here when imported.

Modules are imported lazily so that `moe-adapt` starts fast and an unknown method
name fails before anything heavy is loaded.
"""

import importlib
from collections.abc import Callable
from typing import Any

# name -> module path. Each module defines `validate_config(config) -> None`
# (field checks), `make_setup(config)` (loads data; every data-dependent check)
# and `run(config, workdir, *, setup=None) -> dict` (the results of DESIGN.md).
_METHODS = {
  "adamix": "moe_adapt.methods.adamix",
  "adapter_soup": "moe_adapt.methods.adapter_soup",
  "co_tuning": "moe_adapt.methods.co_tuning",
  "finetune": "moe_adapt.methods.finetune",
  # Both of Meta-DMoE's paths: in memory (methods/meta_dmoe.py) or streaming (data.streaming).
  "meta_dmoe": "moe_adapt.methods.meta_dmoe_stream",
  "muka": "moe_adapt.methods.muka",
  # MUKA / MUKI with fine-tuned text teachers (configs/muka.py:newsgroups_ft).
  "muka_ft": "moe_adapt.methods.muka_ft",
}


def list_methods() -> tuple[str, ...]:
  """Names accepted by `config.method`."""
  return tuple(sorted(_METHODS))


def get_method(name: str) -> Any:
  """Returns the module implementing method `name`.

  Raises:
    ValueError: naming `method` and the accepted values when `name` is unknown.
  """
  if name not in _METHODS:
    raise ValueError(f"method={name!r} is unknown; accepted: {', '.join(list_methods())}")
  return importlib.import_module(_METHODS[name])


def register_method(name: str, module_path: str) -> None:
  """Makes a method implemented outside moe_adapt available to the CLI."""
  _METHODS[name] = module_path


RunFn = Callable[..., dict]
