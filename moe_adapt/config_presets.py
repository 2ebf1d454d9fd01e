"""What the library needs of the config files' presets: the error that names them.

Config files (`configs/`, a package of its own; their shared pieces are
`configs/_shared.py`) raise `UnknownPresetError` for an unknown preset or flag, and
`moe-adapt list` reads the accepted ones from it.
"""

from __future__ import annotations

from collections.abc import Sequence


class UnknownPresetError(ValueError):
  """A config argument names an unknown preset or flag; carries the accepted ones.

  `moe-adapt list` reads the presets of a config file from this error.
  """

  # Defaults: ml_collections' config_flags re-raises a config file's error as type(e)(text).
  def __init__(self, message: str, *, presets: Sequence[str] = (), flags: Sequence[str] = ()):
    super().__init__(message)
    self.presets, self.flags = tuple(presets), tuple(flags)
