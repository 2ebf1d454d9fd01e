"""The `moe-adapt` CLI that SIGKILLs its own process at the point named by $MOE_ADAPT_KILL_AT.

Used by tests/test_kill_resume.py:  `python -m tests.kill_at --config=... --workdir=...`.
The fault is injected by wrapping library functions under their public names (nothing in
moe_adapt knows about it); with the variable unset this is exactly `moe-adapt`.

Kill points (`<stage>` is a checkpoint folder name, `<n>` counts calls in this process):
  save:<stage>:<step>      right after `Checkpointer.save` of that step has returned (the
                           checkpoint is committed), so a restart resumes inside the stage;
  write:<stage>:<step>     inside orbax's commit of that checkpoint: every file of the step
                           is written into its temporary folder, which is not yet renamed;
  call:<module>:<name>:<n>   at the start of the n-th call of `<module>.<name>`;
  return:<module>:<name>:<n> right after the n-th call of `<module>.<name>` has returned.
"""

import functools
import importlib
import os
import pathlib
import signal
import sys

ENV = "MOE_ADAPT_KILL_AT"


def _die() -> None:
  sys.stdout.flush()
  sys.stderr.flush()
  os.kill(os.getpid(), signal.SIGKILL)


def _hook_save(stage: str, step: int) -> None:
  from moe_adapt.train import checkpoint

  original = checkpoint.Checkpointer.save

  @functools.wraps(original)
  def save(self, at_step, *args, **kwargs):
    original(self, at_step, *args, **kwargs)
    if pathlib.Path(self.directory).name == stage and at_step == step:
      _die()

  checkpoint.Checkpointer.save = save


def _hook_write(stage: str, step: int) -> None:
  from orbax.checkpoint.path import atomicity

  original = atomicity.AtomicRenameTemporaryPath.finalize

  @functools.wraps(original)
  async def finalize(self, *args, **kwargs):
    # The step folder's own commit (its items `state` and `meta` are committed inside it
    # first): killing here leaves `<step>.orbax-checkpoint-tmp-*` complete but unrenamed.
    final = pathlib.Path(self.get_final())
    if final.parent.name == stage and final.name == str(step):
      _die()
    return await original(self, *args, **kwargs)

  atomicity.AtomicRenameTemporaryPath.finalize = finalize


def _hook_call(module_name: str, name: str, n: int, *, after: bool) -> None:
  module = importlib.import_module(module_name)
  original = getattr(module, name)
  calls = 0

  @functools.wraps(original)
  def wrapper(*args, **kwargs):
    nonlocal calls
    calls += 1
    if calls == n and not after:
      _die()
    out = original(*args, **kwargs)
    if calls == n and after:
      _die()
    return out

  setattr(module, name, wrapper)


def install(point: str) -> None:
  """Installs the fault hook of kill point `point` (see the module docstring)."""
  kind, *rest = point.split(":")
  if kind in ("save", "write") and len(rest) == 2:
    (_hook_save if kind == "save" else _hook_write)(rest[0], int(rest[1]))
  elif kind in ("call", "return") and len(rest) == 3:
    _hook_call(rest[0], rest[1], int(rest[2]), after=kind == "return")
  else:
    raise ValueError(
      f"{ENV}={point!r} is invalid; accepted: save:<stage>:<step>, write:<stage>:<step>, "
      "call:<module>:<name>:<n>, return:<module>:<name>:<n>"
    )


if __name__ == "__main__":
  if os.environ.get(ENV):
    install(os.environ[ENV])
  from moe_adapt import main

  sys.argv[0] = "moe-adapt"
  main.entry_point()
