"""The Python snippets of docs/*.md run as written, and the pages' links resolve.

Every ```python block of every page is executed, from the repository root, in a fresh
namespace; blocks that are not meant to run are marked ```bash or ```text instead.
"""

import pathlib
import re

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
PAGES = sorted(DOCS.glob("*.md"))
SNIPPETS = [
  (page.name, index, code)
  for page in PAGES
  for index, code in enumerate(re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S))
]
# Markdown links to local files: [text](path) or [text](path#anchor), not URLs or anchors.
LINK = re.compile(r"\]\((?!https?://|#)([^)#\s]+)(?:#[^)]*)?\)")


def test_composing_guide_has_its_snippets():
  pages = {name for name, _, _ in SNIPPETS}
  assert "composing.md" in pages
  assert sum(name == "composing.md" for name, _, _ in SNIPPETS) >= 5


@pytest.mark.parametrize(
  "name, index, code", SNIPPETS, ids=[f"{name}[{index}]" for name, index, _ in SNIPPETS]
)
def test_snippet_runs(name, index, code, monkeypatch):
  monkeypatch.chdir(REPO)  # snippets read config files by their repository path
  exec(compile(code, f"docs/{name}[python {index}]", "exec"), {"__name__": "__docs__"})


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_local_links_resolve(page):
  missing = [
    target for target in LINK.findall(page.read_text()) if not (page.parent / target).exists()
  ]
  assert not missing, f"{page.name} links to missing files: {missing}"


def test_index_lists_every_page():
  index = (DOCS / "index.md").read_text()
  linked = set(LINK.findall(index))
  missing = [p.name for p in PAGES if p.name != "index.md" and p.name not in linked]
  assert not missing, f"docs/index.md does not link {missing}"


def test_api_reference_lists_every_module():
  # docs/api/<layer>.rst names each module explicitly; a new module must be added there
  # (and its docstrings must then pass `bash docs/build_api.sh`).
  api = DOCS / "api"
  documented = set(
    re.findall(
      r"automodule:: (moe_adapt[\w.]*)", "".join(page.read_text() for page in api.glob("*.rst"))
    )
  )
  package = REPO / "moe_adapt"
  modules = {
    ".".join(path.relative_to(REPO).with_suffix("").parts)
    for layer in package.iterdir()
    if (layer / "__init__.py").is_file()
    for path in [layer / "__init__.py", *layer.glob("[!_]*.py")]
  }
  modules = {m.removesuffix(".__init__") for m in modules}
  missing = sorted(modules - documented)
  assert not missing, f"modules missing from docs/api/*.rst: {missing}"
  toctree = (api / "index.rst").read_text()
  layers = sorted(m.split(".")[1] for m in modules if m.count(".") == 1)
  assert all(f"   {layer}\n" in toctree for layer in layers), layers


def test_every_image_is_shown_on_a_page():
  linked = {
    (page.parent / target).resolve() for page in PAGES for target in LINK.findall(page.read_text())
  }
  images = sorted((DOCS / "img").glob("*.png"))
  assert images
  unlinked = [p.name for p in images if p.resolve() not in linked]
  assert not unlinked, f"docs/img images linked from no docs page: {unlinked}"
