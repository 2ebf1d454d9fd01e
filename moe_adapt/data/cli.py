"""`moe-adapt-data`: the data command line.

  moe-adapt-data fetch NAME [--data_dir DIR] [--force]

Fetches and verifies the pinned archives (`fetch.fetch`), then tokenizes every fetched text
source with MiniLM's tokenizer at its default length (`text.tokenized_corpus`). It sits above
both modules, so `fetch` (archives) and `text` (corpora) do not import each other.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import tqdm

from moe_adapt.data import fetch, text


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
    prog="moe-adapt-data", description="Prepare data and pretrained models for moe_adapt."
  )
  commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
  fetch_cmd = commands.add_parser(
    "fetch", help="download and verify pinned archives", description=fetch.__doc__
  )
  fetch_cmd.add_argument("name", metavar="NAME", help=f"one of: {', '.join(fetch.NAMES)}")
  fetch_cmd.add_argument(
    "--data_dir",
    default=None,
    help=f"data directory (default: ${fetch.DATA_DIR_ENV} or {fetch.DEFAULT_DATA_DIR_HELP})",
  )
  fetch_cmd.add_argument("--force", action="store_true", help="download again")
  return parser


def entry_point(argv: Sequence[str] | None = None) -> int:
  """`moe-adapt-data` command line; returns the exit status."""
  parser = _parser()
  args = parser.parse_args(argv)
  if args.name not in fetch.NAMES:
    parser.error(f"NAME={args.name!r} is unknown; accepted: {', '.join(fetch.NAMES)}")
  try:
    paths = fetch.fetch(args.name, args.data_dir, force=args.force)
  except fetch.ArchiveError as e:
    print(f"moe-adapt-data: error: {e}", file=sys.stderr)
    return 1
  for path in paths:
    print(path)
  _tokenize_text_sources(args.name, args.data_dir)
  return 0


def _tokenize_text_sources(name: str, data_dir: str | None) -> None:
  """Builds the tokenization caches of the fetched text sources at their default lengths.

  Needs MiniLM's tokenizer: after `fetch minilm` every text source already fetched is
  tokenized, after `fetch <source>` that source if MiniLM is there, so the order of the
  fetches does not matter. Sources already tokenized are read back from their cache.
  """

  def fetched(source: str) -> bool:
    try:
      fetch.archive_path(source, data_dir, verify=False)  # Verified when read.
    except fetch.ArchiveError:
      return False
    return True

  names = [n for n in text.DEFAULT_MAX_LEN if name in (n, "all", "minilm") and fetched(n)]
  if not names:
    return
  if not fetched("minilm"):
    print(
      "note: the text is tokenized with MiniLM's tokenizer on first use; run "
      "`moe-adapt-data fetch minilm` to have it ready (or pass tokenizer= to the benchmark)"
    )
    return
  for source in tqdm.tqdm(names, desc="tokenize", unit="corpus", disable=len(names) == 1):
    max_len = text.DEFAULT_MAX_LEN[source]
    tqdm.tqdm.write(f"tokenizing {source} (max_len={max_len}) ...")
    text.tokenized_corpus(source, max_len=max_len, data_dir=data_dir)


if __name__ == "__main__":
  sys.exit(entry_point())
