"""DESIGN.md's layers, checked on the source: a layer imports only from the layers below it.

core < data, models (siblings: neither imports the other) < train < methods < recipes < the
top-level modules (CLI, report). Every import counts, also those inside functions.
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "moe_adapt"
RANK = {"core": 0, "data": 1, "models": 1, "train": 2, "methods": 3, "recipes": 4}
TOP = 5  # moe_adapt/*.py: main, merge_cli, report, config_presets (the presets' error)


def layer_of(module: str) -> str:
  parts = module.split(".")
  return parts[1] if len(parts) > 1 and parts[1] in RANK else "<top>"


def rank(layer: str) -> int:
  return RANK.get(layer, TOP)


def imports(path: pathlib.Path) -> list[tuple[int, str]]:
  """(line, module) of every moe_adapt import in the file, at any depth."""
  out = []
  for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
    if isinstance(node, ast.Import):
      out += [(node.lineno, a.name) for a in node.names if a.name.startswith("moe_adapt")]
    elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("moe_adapt"):
      if node.module == "moe_adapt":  # `from moe_adapt import core, data`
        out += [(node.lineno, f"moe_adapt.{a.name}") for a in node.names]
      else:
        out.append((node.lineno, node.module))
  return out


def violations() -> list[str]:
  found = []
  for path in sorted(PACKAGE.rglob("*.py")):
    module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    here = layer_of(module)
    for line, imported in imports(path):
      there = layer_of(imported)
      if there == here or (there == "<top>" and imported == "moe_adapt"):
        continue
      if rank(there) >= rank(here):
        found.append(f"{path.relative_to(PACKAGE.parent)}:{line} ({here}) imports {imported}")
  return found


def test_every_layer_imports_only_layers_below_it():
  assert violations() == []


@pytest.mark.parametrize(
  "module, imported, bad",
  [
    ("moe_adapt.data.text", "moe_adapt.models.bert", True),
    ("moe_adapt.models.bert", "moe_adapt.data.fetch", True),
    ("moe_adapt.core.meta", "moe_adapt.train.stages", True),
    ("moe_adapt.methods.muka", "moe_adapt.recipes", True),
    ("moe_adapt.train.benchmarks", "moe_adapt.models.encoders", False),
    ("moe_adapt.methods.muka", "moe_adapt.core", False),
  ],
)
def test_the_rule_itself(module, imported, bad):
  here, there = layer_of(module), layer_of(imported)
  assert (there != here and rank(there) >= rank(here)) == bad


def module_graph() -> dict[str, set[str]]:
  """moe_adapt module -> the moe_adapt modules it imports (`from pkg import sub` = sub)."""
  names = {
    ".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
    for p in PACKAGE.rglob("*.py")
  }
  graph = {}
  for path in PACKAGE.rglob("*.py"):
    module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    module = module.removesuffix(".__init__")
    edges = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
      if isinstance(node, ast.Import):
        edges |= {a.name for a in node.names if a.name in names}
      elif isinstance(node, ast.ImportFrom) and node.module in names:
        subs = {f"{node.module}.{a.name}" for a in node.names} & names
        edges |= subs or {node.module}
    graph[module] = edges - {module}
  return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """The strongly connected components with more than one module (Tarjan)."""
  index, low, stack, on, out = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on.add(v)
    for w in sorted(graph.get(v, ())):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        out.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return out


def test_no_module_imports_itself_through_others():
  # A package's __init__ re-exports its modules, which import one another by name, never
  # through the package: a cycle through an __init__ would show here too.
  assert cycles(module_graph()) == []


def test_the_cycle_finder_finds_one():
  assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_methods_do_not_know_the_recipes_which_register_themselves():
  methods_source = "".join(p.read_text() for p in (PACKAGE / "methods").rglob("*.py"))
  assert "recipes" not in methods_source.replace("recipes (`moe_adapt.recipes`)", "")
  from moe_adapt import methods, recipes

  assert set(recipes.RECIPES) <= set(methods.list_methods())
  assert methods.get_method("cotuned_teachers").__name__ == "moe_adapt.recipes.cotuned_teachers"
