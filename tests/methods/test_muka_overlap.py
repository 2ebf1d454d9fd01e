"""Tests of MUKA/MUKI with overlapping teacher label sets (`teachers.overlap`).

- `label_chunks(..., overlap=...)`: hand cases and invariants (hypothesis).
- `masked_kl` (UHC with overlapping groups) against a NumPy reference, and equal to
  `grouped_kl` for a partition; the vanilla-KD merged logits against NumPy.
- The targets of every variant on a tiny K = 4, overlap = 1 setup (masked form); teacher
  labels, teacher evaluation and the owner rate with a wrap-around label set.
- One tiny end-to-end CLI run with `--config.teachers.overlap=1`.
- Bad `teachers.overlap` values, each one ValueError naming the field.
"""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_adapt import core
from moe_adapt.methods import muka, muka_setup, muka_stages
from tests.methods.muka_util import CONFIGS, TRAINED, tiny_config, untrained_teachers
from tests.subprocess_util import xla_flags

REPO = pathlib.Path(__file__).resolve().parents[2]


def softmax(z):
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


# ----------------------------------------------------------------------------- label chunks


def test_label_chunks_hand_cases():
  assert muka_setup.label_chunks(10, 2, overlap=0) == muka_setup.label_chunks(10, 2)
  assert muka_setup.label_chunks(10, 2, overlap=1) == ((0, 1, 2, 3, 4, 5), (5, 6, 7, 8, 9, 0))
  # K = 4 on 10 classes: base chunks of 2, 2, 2 and 4; the last wraps to teacher 0's chunk.
  assert muka_setup.label_chunks(10, 4, overlap=1) == (
    (0, 1, 2),
    (2, 3, 4),
    (4, 5, 6),
    (6, 7, 8, 9, 0),
  )
  assert muka_setup.label_chunks(20, 4, overlap=2)[3] == (15, 16, 17, 18, 19, 0, 1)
  assert muka_setup.label_chunks(5, 2, overlap=1) == ((0, 1, 2), (2, 3, 4, 0))


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_label_chunks_invariants(data):
  c = data.draw(st.integers(2, 30), label="num_classes")
  k = data.draw(st.integers(2, c), label="num_teachers")
  size = c // k
  overlap = data.draw(st.integers(0, size - 1), label="overlap")
  chunks = muka_setup.label_chunks(c, k, overlap=overlap)
  base = muka_setup.label_chunks(c, k)
  assert len(chunks) == k
  counts = np.zeros(c, int)
  for j, chunk in enumerate(chunks):
    assert chunk[: len(base[j])] == base[j]  # the own chunk first, in label order
    assert chunk[len(base[j]) :] == base[(j + 1) % k][:overlap]  # then the next one's head
    assert len(set(chunk)) == len(chunk) == len(base[j]) + overlap
    counts[list(chunk)] += 1
    # Every teacher keeps a class no other teacher knows.
    others = set().union(*(set(o) for i, o in enumerate(chunks) if i != j))
    assert set(chunk) - others
  assert np.all(counts >= 1) and np.all(counts <= 2)  # the union is range(C)
  assert np.sum(counts == 2) == k * overlap  # neighbours share exactly `overlap` classes


@pytest.mark.parametrize(
  "args, match",
  [
    ((10, 2, 5), r"teachers\.overlap=5 is invalid for 10 classes and 2 teachers; accepted: "
     r"an integer in \[0, 4\]"),
    ((10, 4, 2), r"teachers\.overlap=2 is invalid .* accepted: an integer in \[0, 1\]"),
    ((10, 10, 1), r"teachers\.overlap=1 is invalid .* accepted: an integer in \[0, 0\]"),
    ((10, 2, -1), r"teachers\.overlap=-1 is invalid"),
    ((10, 2, True), r"teachers\.overlap=True is invalid; accepted: an integer >= 0"),
  ],
)  # fmt: skip
def test_label_chunks_refuses_bad_overlap(args, match):
  c, k, overlap = args
  with pytest.raises(ValueError, match=match):
    muka_setup.label_chunks(c, k, overlap=overlap)


def test_config_refuses_bad_overlap():
  muka.validate_config(tiny_config(**{"teachers.overlap": 4}))  # the bound is data-dependent
  for value in (-1, 1.5):
    cfg = tiny_config()
    cfg.teachers = ml_collections.ConfigDict({**cfg.teachers.to_dict(), "overlap": value})
    with pytest.raises(ValueError, match=rf"teachers\.overlap={value!r} is invalid; accepted: an"):
      muka.validate_config(cfg)
  with pytest.raises(ValueError, match=r"teachers\.overlap=5 is invalid for 10 classes and 2"):
    muka.make_setup(tiny_config(**{"teachers.overlap": 5}))
  for arg in ("fmnist", "fmnist,tiny", "newsgroups", "newsgroups,tiny", "newsgroups,hetero"):
    assert CONFIGS.get_config(arg).teachers.overlap == 0


# ----------------------------------------------------------------------------- losses


def masked_kl_reference(q, z, sets):
  """Σ_g Σ_{c in S_g} q[g, c] (log q[g, c] − log softmax(z[S_g])), with loops."""
  out = np.zeros(len(z))
  for g, s in enumerate(sets):
    if not len(s):
      continue
    zs = z[:, s].astype(np.float64)
    log_p = zs - np.log(np.exp(zs).sum(1, keepdims=True))
    qs = q[:, g, s].astype(np.float64)
    out += np.sum(np.where(qs > 0, qs * np.log(np.where(qs > 0, qs, 1.0)), 0.0) - qs * log_p, 1)
  return out


masked_kl = jax.jit(core.losses.masked_kl)


def test_masked_kl_overlapping_groups_against_numpy():
  rng = np.random.default_rng(0)
  sets = [[0, 1, 2, 3], [3, 4, 5, 0], [5, 6], []]  # overlapping, plus one empty group
  b, c = 7, 7
  mask = np.zeros((4, c), np.float32)
  q = np.zeros((b, 4, c), np.float32)
  for g, s in enumerate(sets):
    mask[g, s] = 1.0
    if s:
      q[:, g, s] = rng.dirichlet(np.ones(len(s)), size=b)
  q[0, 0, 1] = 0.0  # a zero target entry (xlogy(0, 0) = 0)
  q[0, 0] /= q[0, 0].sum()
  noise = q + rng.uniform(size=q.shape).astype(np.float32) * (1 - mask)  # outside: ignored
  z = rng.normal(size=(b, c)).astype(np.float32) * 2
  got = np.asarray(masked_kl(noise, z, mask))
  np.testing.assert_allclose(got, masked_kl_reference(q, z, sets), rtol=1e-5, atol=1e-5)
  assert got.dtype == np.float32 and np.all(got >= -1e-5)
  grad = jax.grad(lambda zz: jnp.sum(core.losses.masked_kl(q, zz, mask)))(jnp.asarray(z))
  assert np.all(np.isfinite(grad))
  # KL is 0 where the student's renormalised distributions equal the targets.
  zq = np.log(np.array([[0.1, 0.2, 0.3, 0.4]], np.float32))
  one = np.array([[[0.1, 0.2, 0.3, 0.4], [0, 0.2 / 0.6, 0, 0.4 / 0.6]]], np.float32)
  m = np.array([[1, 1, 1, 1], [0, 1, 0, 1]], np.float32)
  np.testing.assert_allclose(core.losses.masked_kl(one, zq, m), [0.0], atol=1e-6)


def test_masked_kl_equals_grouped_kl_for_a_partition():
  rng = np.random.default_rng(1)
  groups = np.array([0, 0, 1, 1, 1, 2, 2, 2, 2, 2], np.int32)
  q = np.concatenate(
    [rng.dirichlet(np.ones(n), size=6) for n in np.bincount(groups)], axis=1
  ).astype(np.float32)
  z = rng.normal(size=(6, 10)).astype(np.float32)
  mask = np.eye(3, dtype=np.float32)[groups].T  # [G, C]
  stacked = q[:, None, :] * mask[None]
  got = core.losses.masked_kl(stacked, z, mask)
  ref = core.losses.grouped_kl(q, z, groups, 3)
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
  sets = [np.flatnonzero(groups == g) for g in range(3)]
  np.testing.assert_allclose(got, masked_kl_reference(stacked, z, sets), rtol=1e-5, atol=1e-5)


def test_merged_logits_against_numpy():
  rng = np.random.default_rng(2)
  chunks = ((0, 1, 2), (2, 3, 4), (4, 5, 0))
  logits = [rng.normal(size=(5, 3)).astype(np.float32) for _ in chunks]
  got = muka.merged_logits(logits, chunks, 6)
  ref = np.zeros((5, 6))
  for c in range(6):
    ref[:, c] = np.mean([z[:, ch.index(c)] for z, ch in zip(logits, chunks) if c in ch], axis=0)
  np.testing.assert_allclose(got, ref, rtol=1e-6)
  np.testing.assert_allclose(got[:, 1], logits[0][:, 1])  # not shared: the one teacher's
  np.testing.assert_allclose(got[:, 0], (logits[0][:, 0] + logits[2][:, 2]) / 2, rtol=1e-6)
  disjoint = muka.merged_logits(logits[:2], ((0, 1, 2), (3, 4, 5)), 6)
  np.testing.assert_array_equal(disjoint, np.concatenate(logits[:2], axis=1))
  with pytest.raises(ValueError, match=r"classes \[5\] belong to no teacher"):
    muka.merged_logits(logits[:2], ((0, 1, 2), (2, 3, 4)), 6)


# ----------------------------------------------------------------------------- a tiny setup


@pytest.fixture(scope="module")
def setup4():
  """The tiny setup with K = 4 teachers and overlap 1: (0,1,2) (2,3,4) (4,5,6) (6,7,8,9,0)."""
  return muka.make_setup(tiny_config(**{"teachers.num_teachers": 4, "teachers.overlap": 1}))


@pytest.fixture(scope="module")
def scores4(setup4):
  """Scores of untrained teachers (well-formed, not meaningful)."""
  return muka.compute_scores(setup4, untrained_teachers(setup4))


def test_setup_label_sets_and_teacher_labels(setup4):
  assert setup4.chunks == ((0, 1, 2), (2, 3, 4), (4, 5, 6), (6, 7, 8, 9, 0))
  assert setup4.overlapping and not muka.make_setup(tiny_config()).overlapping
  assert [m.num_classes for m in setup4.teacher_models] == [3, 3, 3, 5]
  mask = setup4.membership()
  np.testing.assert_array_equal(mask.sum(0), [2, 1, 2, 1, 2, 1, 2, 1, 1, 1])
  for k, chunk in enumerate(setup4.chunks):
    idx, local = setup4.teacher_examples(k), setup4.teacher_labels(k)
    assert len(idx) == len(local) > 0 and local.dtype == np.int32
    assert set(np.unique(setup4.train.y[idx])) == set(chunk)  # shared classes included
    np.testing.assert_array_equal(np.asarray(chunk)[local], setup4.train.y[idx])


def test_targets_of_every_variant_with_overlap(setup4, scores4):
  n, c = len(setup4.train.y), 10
  mask = setup4.membership()
  logits = [scores4[f"logits_{k}"] for k in range(4)]
  for variant in TRAINED:
    t = muka.variant_targets(setup4, variant, scores4)
    q, groups = t["targets"], t["groups"]
    assert q.shape == (n, 4, c) and groups.shape == (4, c) and q.dtype == np.float32
    assert np.all(q >= 0)
    if variant == "uhc":
      np.testing.assert_array_equal(groups, mask)
      for k, chunk in enumerate(setup4.chunks):
        np.testing.assert_allclose(q[:, k, list(chunk)], softmax(logits[k]), atol=1e-6)
        np.testing.assert_array_equal(q[:, k] * (1 - mask[k]), 0.0)
      continue
    np.testing.assert_array_equal(groups, [[1.0] * c] + [[0.0] * c] * 3)  # one whole-row group
    np.testing.assert_array_equal(q[:, 1:], 0.0)
    row = q[:, 0]
    np.testing.assert_allclose(row.sum(1), 1.0, atol=1e-5)
    if variant == "vanilla_kd":
      np.testing.assert_allclose(
        row, softmax(muka.merged_logits(logits, setup4.chunks, c) / 5.0), atol=1e-6
      )
    if variant in ("muki", "hard", "single_pass"):
      conf = scores4["single" if variant == "single_pass" else "mc"]
      if variant == "hard":
        w = np.eye(4)[conf.argmax(1)]
      else:
        w = softmax(conf / 0.2)
      ref = np.zeros((n, c))
      for k, chunk in enumerate(setup4.chunks):
        ref[:, list(chunk)] += w[:, k : k + 1] * softmax(logits[k])
      np.testing.assert_allclose(row, ref, atol=1e-5)


def test_teacher_evaluation_and_owner_rate_with_a_wrapping_label_set(setup4, monkeypatch):
  for k, chunk in enumerate(setup4.chunks):
    # Fake predictions: the local index of the gold label (teacher 3's set wraps to class 0).
    local = {c: i for i, c in enumerate(chunk)}
    gold = setup4.test.y[np.isin(setup4.test.y, chunk)]
    monkeypatch.setattr(muka_stages, "_predict", lambda s, m, v, x, gold=gold, local=local: (
      np.array([local[c] for c in gold[: len(x)]])))  # fmt: skip
    assert muka_stages.evaluate_teacher(setup4, k, {})[f"subset_{k}"]["accuracy"] == 1.0
  # Owner rate: teacher 0 always most confident; it knows classes 0, 1, 2 (0 and 2 shared).
  y = setup4.train.y
  conf = np.zeros((len(y), 4), np.float32)
  conf[:, 0] = 1.0
  assert muka_stages.owner_rate(setup4, conf) == pytest.approx(np.mean(y <= 2))


# ----------------------------------------------------------------------------- the CLI


@pytest.mark.slow
def test_cli_run_with_overlapping_teachers(tmp_path):
  env = dict(os.environ, XLA_FLAGS=xla_flags(1), JAX_PLATFORMS="cpu")
  workdir = tmp_path / "run"
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "moe_adapt.main",
      "--config=configs/muka.py:fmnist,tiny",
      "--config.teachers.overlap=1",
      f"--workdir={workdir}",
    ],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads((workdir / "results.json").read_text())
  assert results["overlap"] == 1
  assert results["teacher_labels"] == [[0, 1, 2, 3, 4, 5], [5, 6, 7, 8, 9, 0]]
  assert results["teacher_classes"][1][-1] == "T-shirt/top"
  metrics = results["metrics"]
  assert set(metrics) == {*TRAINED, "teacher_0", "teacher_1"}
  n_test = results["num_examples"]["test"]
  for variant in TRAINED:
    m = metrics[variant]
    assert set(m) == {"union", "subset_0", "subset_1", "mean"}
    acc = m["union"]["accuracy"]
    assert 0.0 <= acc <= 1.0 and round(acc * n_test) == pytest.approx(acc * n_test, abs=1e-6)
  for k in range(2):
    assert 0.0 <= metrics[f"teacher_{k}"][f"subset_{k}"]["accuracy"] <= 1.0
  with np.load(workdir / muka.CONFIDENCE_FILE) as f:
    assert f["logits_0"].shape[1] == f["logits_1"].shape[1] == 6
