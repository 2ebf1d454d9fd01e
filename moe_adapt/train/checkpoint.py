"""Checkpoints of one training stage: a thin wrapper around orbax's CheckpointManager.

Nothing else in moe_adapt touches orbax. One `Checkpointer` manages one stage,
conventionally `<workdir>/checkpoints/<stage>/`, holding one folder per saved
step (`<step>/state/` the pytree, `<step>/meta/` a small JSON record
`{"step", "finished"}`).

Safety properties:

- a save is atomic and `save` returns only once it is complete, so a kill
  afterwards never loses that checkpoint. Locally orbax writes into
  `<step>.orbax-checkpoint-tmp-*` and renames it when complete; on an object
  store (`gs://`), which has no atomic folder rename, it writes `<step>/` in
  place and marks it complete by writing `<step>/commit_success.txt` last;
- unfinished saves left by a kill (temporary folders; on an object store, step
  folders without `commit_success.txt`) are removed on construction and are
  never restored;
- `restore` returns the newest checkpoint that actually reads back. Newer ones
  that fail (a file truncated or removed) are reported with a warning and moved
  aside to `damaged-<step>-<time>/` (never deleted), so that training can save
  those steps again.
"""

from __future__ import annotations

import datetime
import logging
import os
import warnings
from collections.abc import Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from moe_adapt.train import workdir as workdir_lib

PyTree = Any

_STATE, _META = "state", "meta"
# orbax writes a step into a temporary folder and renames it to `<step>/` when complete.
_TMP_MARKER = ".orbax-checkpoint-tmp"  # orbax 0.12 names it "<step>.orbax-checkpoint-tmp"
# On object stores orbax writes `<step>/` in place and this file last (orbax's COMMIT_SUCCESS_FILE).
COMMIT_FILE = "commit_success.txt"
DAMAGED_PREFIX = "damaged-"


class CheckpointRestoreError(ValueError):
  """No checkpoint of a stage can be restored into the given state (e.g. the model changed)."""


def _is_key(x: Any) -> bool:
  """Whether `x` is a typed PRNG key array (or the ShapeDtypeStruct of one)."""
  dtype = getattr(x, "dtype", None)
  return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _key_impl(x: Any) -> Any:
  if isinstance(x, jax.Array):
    return jax.random.key_impl(x)
  return x.dtype._impl  # A ShapeDtypeStruct: JAX has no public accessor for its impl.


def _encode(tree: PyTree) -> PyTree:
  """Typed PRNG keys -> their uint32 data; other leaves unchanged.

  Keys are stored as plain arrays and re-wrapped from the template on restore,
  so that their type never depends on orbax's optional per-array metadata
  (without which orbax would silently hand back raw uint32 data).
  """
  return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def _default_sharding() -> jax.sharding.Sharding:
  return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def _abstract_leaf(x: Any) -> Any:
  """The restore target of one template leaf.

  jax.Arrays become ShapeDtypeStructs carrying their sharding, and keys the
  ShapeDtypeStruct of their uint32 data. A ShapeDtypeStruct without a sharding
  is placed on the first local device: otherwise orbax would reuse the saved
  sharding, which fails when the device count differs from the one that
  saved. NumPy arrays and Python scalars are restored as such.
  """
  if not isinstance(x, jax.Array | jax.ShapeDtypeStruct):
    return x
  sharding = getattr(x, "sharding", None) or _default_sharding()
  if _is_key(x):
    data = jax.eval_shape(jax.random.key_data, x)
    return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=sharding)
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


def _decode_leaf(template: Any, restored: Any) -> Any:
  """Re-wraps keys and checks that a restored array has the template's shape and dtype."""
  if not isinstance(template, jax.Array | jax.ShapeDtypeStruct):
    return restored
  if _is_key(template):
    restored = jax.random.wrap_key_data(restored, impl=_key_impl(template))
  if not isinstance(restored, jax.Array) or (restored.shape, restored.dtype) != (
    template.shape,
    template.dtype,
  ):
    got = (getattr(restored, "shape", None), getattr(restored, "dtype", type(restored)))
    raise ValueError(
      f"restored leaf has shape/dtype {got}, expected {(template.shape, template.dtype)}"
    )
  return restored


class _DropOrbaxInfo(logging.Filter):
  """Drops orbax's INFO/DEBUG records (dozens per save) and keeps its warnings and errors."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or f"{os.sep}orbax{os.sep}" not in record.pathname


_ORBAX_FILTER = _DropOrbaxInfo()


def _quiet_orbax_info_logs() -> None:
  # orbax logs through absl's single "absl" logger, which `absl.app.run` shows
  # at INFO: without this, progress bars drown in checkpoint chatter.
  absl_logger = logging.getLogger("absl")
  if _ORBAX_FILTER not in absl_logger.filters:
    absl_logger.addFilter(_ORBAX_FILTER)


def _describe(error: Exception, limit: int = 300) -> str:
  """One line naming the exception, whitespace collapsed, cut to `limit` characters."""
  text = " ".join(f"{type(error).__name__}: {error}".split())
  return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_primary() -> bool:
  return jax.process_index() == 0


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


class Checkpointer:
  """Saves and restores the state of one training stage.

  Example:
    with Checkpointer(f"{workdir}/checkpoints/experts") as ckpt:
      restored = ckpt.restore(state)          # None on a fresh start
      ...
      ckpt.save(step, state, finished=step == num_steps)
  """

  def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 2):
    """Opens (creating if needed) the checkpoint folder of a stage.

    Args:
      directory: the stage's checkpoint folder, e.g. `<workdir>/checkpoints/<stage>`;
        local or remote (`gs://...`).
      max_to_keep: how many of the newest checkpoints to keep (>= 1). Keeping 2
        leaves a fallback when the newest one turns out damaged.
    """
    if isinstance(max_to_keep, bool) or not isinstance(max_to_keep, int) or max_to_keep < 1:
      raise ValueError(f"max_to_keep={max_to_keep!r} is invalid; accepted: an int >= 1")
    self._directory = workdir_lib.as_path(directory)
    if self._directory.exists() and not self._directory.is_dir():
      raise ValueError(
        f"checkpoint directory={str(self._directory)!r} exists and is not a directory"
      )
    _quiet_orbax_info_logs()
    self._remove_unfinished_saves()
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
    self._manager = ocp.CheckpointManager(
      self._directory, options=options, item_names=(_STATE, _META)
    )

  def _remove_unfinished_saves(self) -> None:
    """Deletes the folders of saves cut short by a kill: incomplete by construction.

    Locally these are orbax's temporary folders; on an object store, step folders
    without the commit file (orbax ignores them, but a new save of that step would
    write among their leftovers). Done here, synchronously, rather than by orbax's
    `cleanup_tmp_directories`, which runs in a background thread.
    """
    if _is_primary() and self._directory.is_dir():
      remote = not workdir_lib.is_local(self._directory)
      for path in self._directory.iterdir():
        unfinished = _TMP_MARKER in path.name or (
          remote and path.name.isdigit() and not (path / COMMIT_FILE).exists()
        )
        if unfinished and path.is_dir():
          path.rmtree()
    _sync("moe_adapt.checkpoint.remove_unfinished_saves")

  @property
  def directory(self) -> epath.Path:
    """The stage's checkpoint folder."""
    return self._directory

  def all_steps(self) -> list[int]:
    """The steps of the committed checkpoints on disk, increasing."""
    return sorted(self._manager.all_steps())

  def save(self, step: int, tree: PyTree, *, finished: bool = False) -> None:
    """Writes `tree` as the checkpoint of `step` and returns once it is on disk.

    Args:
      step: the number of completed training steps; larger than any saved step,
        or equal to the newest one, which is then replaced (used to mark a
        stage finished).
      tree: a pytree of jax/NumPy arrays and scalars (any dtype, incl. bfloat16
        and PRNG keys).
      finished: whether the stage is complete (`is_finished` then reports True).

    Raises:
      ValueError: if `step` is negative or older than the newest checkpoint.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
      raise ValueError(f"step={step!r} is invalid; accepted: an int >= 0")
    latest = self._manager.latest_step()
    if latest is not None and step < latest:
      raise ValueError(
        f"step={step} is older than the newest checkpoint (step {latest}) in {self._directory}; "
        "checkpoints must be saved at increasing steps"
      )
    if latest == step:
      self._manager.delete(step)
    args = ocp.args.Composite(
      **{
        _STATE: ocp.args.StandardSave(_encode(tree)),
        _META: ocp.args.JsonSave({"step": step, "finished": bool(finished)}),
      }
    )
    # force=True: the decision to save is the caller's, not orbax's interval policy.
    self._manager.save(step, args=args, force=True)
    self._manager.wait_until_finished()
    self._manager.check_for_errors()

  def _restore_step(self, step: int, template: PyTree) -> tuple[PyTree, dict]:
    abstract = jax.tree.map(_abstract_leaf, template)
    args = ocp.args.Composite(
      **{_STATE: ocp.args.StandardRestore(abstract), _META: ocp.args.JsonRestore()}
    )
    restored = self._manager.restore(step, args=args)
    meta = restored[_META]
    if not isinstance(meta, Mapping) or meta.get("step") != step:
      raise ValueError(f"meta record {meta!r} does not match the step")
    tree = jax.tree.map(_decode_leaf, template, restored[_STATE])
    return tree, dict(meta)

  def restore(self, abstract_tree: PyTree) -> tuple[int, PyTree, dict] | None:
    """The newest intact checkpoint, or None if there is none.

    Args:
      abstract_tree: a pytree with the structure of the saved one whose leaves are
        arrays or `jax.ShapeDtypeStruct` objects. Restored arrays take their dtypes and
        their shardings (when given; else the first local device).

    Returns:
      (step, tree, meta) with meta = {"step": int, "finished": bool}, or None when
      the folder holds no checkpoint.

    Raises:
      CheckpointRestoreError: checkpoints exist but none can be restored into
        `abstract_tree` (typically: the state's structure or shapes changed).
    """
    steps = self.all_steps()
    errors: list[tuple[int, Exception]] = []
    for step in reversed(steps):
      try:
        tree, meta = self._restore_step(step, abstract_tree)
      except Exception as e:  # Any failure means: try an older one.
        errors.append((step, e))
        continue
      for bad_step, error in errors:
        moved = self._move_aside(bad_step)
        warnings.warn(
          f"checkpoint step {bad_step} in {self._directory} is damaged and was skipped "
          f"({_describe(error)}); it was moved to {moved.name}/ and "
          f"training resumes from step {step}",
          RuntimeWarning,
          stacklevel=2,
        )
      return step, tree, meta
    if not errors:
      return None
    details = "; ".join(f"step {s}: {_describe(e)}" for s, e in errors)
    raise CheckpointRestoreError(
      f"no checkpoint in {self._directory} can be restored into the given state ({details}). "
      "If the model or optimizer changed, use another --workdir or --overwrite."
    )

  def _move_aside(self, step: int) -> epath.Path:
    """Renames a damaged step folder so that orbax no longer sees it; returns the new path."""
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    target = self._directory / f"{DAMAGED_PREFIX}{step}-{stamp}"
    if _is_primary():
      n = 1
      while target.exists():
        target = self._directory / f"{DAMAGED_PREFIX}{step}-{stamp}-{n}"
        n += 1
      (self._directory / str(step)).rename(target)
    _sync(f"moe_adapt.checkpoint.move_aside.{step}")
    self._manager.reload()
    return target

  def is_finished(self) -> bool:
    """Whether the newest checkpoint with a readable meta record has finished=True.

    Only the small meta record is read (no template is needed); `restore` is
    what verifies that the state itself reads back.
    """
    for step in reversed(self.all_steps()):
      try:
        meta = self._manager.restore(
          step, args=ocp.args.Composite(**{_META: ocp.args.JsonRestore()})
        )[_META]
      except Exception:  # A damaged record: look at an older one.
        continue
      return bool(isinstance(meta, Mapping) and meta.get("finished", False))
    return False

  def close(self) -> None:
    """Waits for pending writes and releases orbax's resources."""
    self._manager.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()
