"""Sphinx configuration of the moe_adapt API reference (built by docs/build_api.sh)."""

import pathlib
import sys

# The package is installed editable in CI; the path makes a plain checkout work too.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

project = "moe_adapt"
author = "moe_adapt authors"
copyright = "moe_adapt authors, MIT licence"

extensions = [
  "sphinx.ext.autodoc",
  "sphinx.ext.napoleon",
  "sphinx.ext.mathjax",
]

# Google-style docstrings (Args/Returns/Raises), as in JAX, Flax and optax.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
# Attributes sections become fields of the class entry, not second descriptions of the
# dataclass / NamedTuple fields that autodoc documents anyway.
napoleon_use_ivar = True

autodoc_default_options = {"members": True, "member-order": "bysource"}
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
# Methods without their own docstring (e.g. Flax's `setup`) are left out instead of
# repeating the base class's text.
autodoc_inherit_docstrings = False
# `x`: an inline literal in these docstrings (they use Markdown-style backticks).
default_role = "code"

# -n (nitpicky) checks every cross-reference; these targets live in other projects'
# documentation, which is not fetched (the build runs offline).
nitpick_ignore_regex = [
  (
    r"py:.*",
    r"(jax|jnp|np|numpy|optax|flax|nn|chex|ml_collections|orbax|tfds|tensorflow_datasets"
    r"|absl|tokenizers|safetensors|etils|sklearn|scipy|matplotlib|tqdm|utils|grain)(\..*)?",
  ),
  (r"py:.*", r"(collections\.abc|typing|types|pathlib|os|dataclasses|concurrent)\..*"),
  (r"py:.*", r"(PyTree|LossFn|Any|Callable|Sequence|Mapping|Iterator|Iterable|Path)"),
  # A fragment of the field annotations that tfds.core.BuilderConfig contributes to
  # data.tfds_builders.BenchmarkConfig's signature.
  (r"py:class", r"(dict|tuple)\[str"),
]

exclude_patterns = ["_build"]
html_theme = "alabaster"
html_static_path = []

# "more than one target found": a short name in an annotation (e.g. `Task`) that two
# modules define. Not a broken reference, so not an error.
suppress_warnings = ["ref.python"]

_LAYERS = ("core", "data", "models", "train", "methods", "recipes")


def _resolve_layer_alias(app, env, node, contnode):
  """Resolves `models.Classifier`-style names: modules import layers as `from moe_adapt import
  models`, so annotations name them without the package prefix, and the object is documented
  in its submodule (`moe_adapt.models.classifier.Classifier`)."""
  target = node.get("reftarget", "")
  layer, _, name = target.partition(".")
  if node.get("refdomain") != "py" or layer not in _LAYERS or not name:
    return None
  domain = env.get_domain("py")
  prefix, suffix = f"moe_adapt.{layer}.", f".{name}"
  matches = [
    full
    for full in domain.objects
    if full == prefix + name or (full.startswith(prefix) and full.endswith(suffix))
  ]
  if len(matches) != 1:
    return None
  return domain.resolve_xref(
    env, node["refdoc"], app.builder, node["reftype"], matches[0], node, contnode
  )


def setup(app):
  app.connect("missing-reference", _resolve_layer_alias)
