"""Tests of moe_adapt.methods.muka and configs/muka.py.

- End to end through the CLI (`python -m moe_adapt.main --config=configs/muka.py:
  fmnist,tiny`): results.json with every variant, accuracies over the union labels and per
  teacher subset, each teacher alone on its classes.
- In process: the integrated targets of each variant (rows sum to 1, teacher k's mass only
  in its slot), the teacher scores cached once in the workdir, the grouped KL against NumPy,
  the label chunks; the student step gives the same losses and parameters on a 1-device and
  an 8-device data-parallel mesh (`eight_devices`: a child pytest on 8 fake CPU devices).
- Bad inputs, each one ValueError naming the field.
"""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from moe_adapt import core
from moe_adapt.methods import muka, muka_setup
from moe_adapt.train import mesh as mesh_lib
from tests.methods import configs_util
from tests.methods.muka_util import CONFIGS, TRAINED, tiny_config, untrained_teachers
from tests.subprocess_util import xla_flags

REPO = pathlib.Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("muka_cli")
  env = dict(os.environ, XLA_FLAGS=xla_flags(1), JAX_PLATFORMS="cpu")
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "moe_adapt.main",
      "--config=configs/muka.py:fmnist,tiny",
      f"--workdir={tmp / 'run'}",
    ],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  return tmp / "run"


@pytest.mark.slow
def test_cli_run_reports_every_variant(cli_run):
  results = json.loads((cli_run / "results.json").read_text())
  assert results["method"] == "muka" and results["target_domains"] == ["rot0"]
  metrics = results["metrics"]
  assert set(metrics) == {*TRAINED, "teacher_0", "teacher_1"}
  n_test = results["num_examples"]["test"]
  for variant in TRAINED:
    m = metrics[variant]
    assert set(m) == {"union", "subset_0", "subset_1", "mean"}
    for part in m.values():
      assert 0.0 <= part["accuracy"] <= 1.0
    acc = m["union"]["accuracy"]
    assert m["mean"]["accuracy"] == acc
    assert round(acc * n_test) == pytest.approx(acc * n_test, abs=1e-6)  # k / N
  configs_util.check_per_example(results, {*TRAINED, "teacher_0", "teacher_1"})
  for k in range(2):
    assert set(metrics[f"teacher_{k}"]) == {f"subset_{k}", "mean"}
    assert 0.0 <= metrics[f"teacher_{k}"][f"subset_{k}"]["accuracy"] <= 1.0
  assert results["teacher_classes"][0][0] == "T-shirt/top"
  assert len(results["teacher_classes"][1]) == 5
  assert (cli_run / muka.CONFIDENCE_FILE).is_file()
  for stage in ("teacher_0", "teacher_1", *TRAINED):
    assert (cli_run / "checkpoints" / stage).is_dir()


# ----------------------------------------------------------------------------- in process


@pytest.fixture(scope="module")
def setup4():
  """The tiny setup with K = 4 teachers (chunks of 2, 2, 2 and 4 classes)."""
  return muka.make_setup(tiny_config(**{"teachers.num_teachers": 4}))


@pytest.fixture(scope="module")
def teachers4(setup4):
  return untrained_teachers(setup4)


@pytest.fixture(scope="module")
def scores4(setup4, teachers4):
  return muka.compute_scores(setup4, teachers4)


def test_label_chunks():
  assert muka_setup.label_chunks(10, 2) == ((0, 1, 2, 3, 4), (5, 6, 7, 8, 9))
  assert muka_setup.label_chunks(10, 4) == ((0, 1), (2, 3), (4, 5), (6, 7, 8, 9))


def test_scores_are_cached_once(setup4, teachers4, tmp_path, monkeypatch):
  first = muka.teacher_scores(setup4, teachers4, str(tmp_path))
  n = len(setup4.train.y)
  assert first["mc"].shape == (n, 4) and first["single"].shape == (n, 4)
  assert np.all((first["mc"] >= 0) & (first["mc"] <= 1))
  for k, chunk in enumerate(setup4.chunks):
    assert first[f"logits_{k}"].shape == (n, len(chunk))

  def fail(*args, **kwargs):
    raise AssertionError("scores computed a second time")

  monkeypatch.setattr(muka, "compute_scores", fail)
  second = muka.teacher_scores(setup4, teachers4, str(tmp_path))
  for name in first:
    np.testing.assert_array_equal(second[name], first[name])


@pytest.mark.parametrize("variant", ["muki", "hard", "single_pass", "vanilla_kd", "oracle"])
def test_targets_are_distributions_in_the_right_slots(setup4, scores4, variant):
  scores = scores4
  t = muka.variant_targets(setup4, variant, scores)
  q = t["targets"]
  assert q.shape == (len(setup4.train.y), 10) and np.all(q >= 0)
  np.testing.assert_allclose(q.sum(axis=1), 1.0, atol=1e-5)
  if variant in ("muki", "hard", "single_pass"):
    conf = scores["single" if variant == "single_pass" else "mc"]
    for k, chunk in enumerate(setup4.chunks):
      slot = q[:, list(chunk)]
      probs = np.exp(scores[f"logits_{k}"])
      probs /= probs.sum(axis=1, keepdims=True)
      if variant == "hard":
        w = (np.argmax(conf, axis=1) == k).astype(np.float32)
      else:
        e = np.exp((conf - conf.max(axis=1, keepdims=True)) / 0.2)
        w = (e / e.sum(axis=1, keepdims=True))[:, k]
      # Teacher k's mass w_k lies only in its own slot, shaped as its distribution.
      np.testing.assert_allclose(slot.sum(axis=1), w, atol=1e-5)
      np.testing.assert_allclose(slot, w[:, None] * probs, atol=1e-5)
    top2 = np.sort(conf, axis=1)[:, -2:]
    np.testing.assert_allclose(t["weights"], top2[:, 1] - top2[:, 0] + 1e-6, atol=1e-6)


def test_uhc_targets_and_grouped_kl_against_numpy(setup4, scores4):
  t = muka.variant_targets(setup4, "uhc", scores4)
  q, groups = t["targets"], t["groups"]
  np.testing.assert_array_equal(groups, [0, 0, 1, 1, 2, 2, 3, 3, 3, 3])
  for k in range(4):
    np.testing.assert_allclose(q[:, groups == k].sum(axis=1), 1.0, atol=1e-5)
  z = np.random.default_rng(0).normal(size=q.shape).astype(np.float32)
  expected = np.zeros(len(q))
  for k in range(4):
    zk = z[:, groups == k]
    log_p = zk - np.log(np.exp(zk).sum(axis=1, keepdims=True))
    qk = q[:, groups == k]
    expected += np.sum(qk * (np.log(np.maximum(qk, 1e-30)) - log_p), axis=1)
  got = core.losses.grouped_kl(jnp.asarray(q), jnp.asarray(z), jnp.asarray(groups), 4)
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-4, atol=1e-5)
  # One group: the plain KL(q ‖ softmax(z)).
  p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
  qn = q / q.sum(axis=1, keepdims=True)
  one = core.losses.grouped_kl(jnp.asarray(qn), jnp.asarray(z), jnp.zeros(10, jnp.int32), 4)
  np.testing.assert_allclose(
    np.asarray(one), np.sum(qn * (np.log(qn) - np.log(p)), axis=1), rtol=1e-4, atol=1e-5
  )


# ----------------------------------------------------------------------------- 1 vs 8 devices

STUDENT_STEPS = 3


@pytest.fixture(scope="module")
def student_runs():
  """Losses and final host state of STUDENT_STEPS student steps on a 1- and an 8-device mesh.

  Same initial state and inputs on both meshes. Plain SGD: parameters then differ exactly by
  lr × (gradient difference), whereas Adam would turn a rounding-level gradient difference
  into a full-size update wherever a gradient is ~0. The targets are random distributions
  over two label groups (UHC-style), with random per-example weights, a temperature and a
  scale, so that every input of the shared step matters.
  """
  setups = {nd: muka.make_setup(tiny_config(num_devices=nd)) for nd in (1, 8)}
  one = setups[1]
  tx = optax.sgd(0.5)
  initial = jax.device_get(
    muka.init_model(one.student_model, one.key("student_init"), one.input_shape, tx)
  )
  n, c = len(one.train.y), one.num_classes
  rng = np.random.default_rng(0)
  groups = np.repeat(np.arange(2, dtype=np.int32), c // 2)
  e = np.exp(rng.normal(size=(n, c)) * 2)
  targets = np.concatenate([e[:, g == groups] / e[:, g == groups].sum(1, keepdims=True)
                            for g in (0, 1)], axis=1).astype(np.float32)  # fmt: skip
  weights = rng.uniform(0.2, 1.0, size=n).astype(np.float32)
  coefs = {"temperature": np.float32(2.0), "scale": np.float32(4.0)}
  runs = {}
  for nd, setup in setups.items():
    assert setup.mesh.size == nd
    step_fn = muka.make_student_step(setup, tx)
    rep = mesh_lib.replicated(setup.mesh)
    arrays = jax.device_put((targets, weights, groups, coefs), rep)
    state, losses = jax.device_put(initial, rep), []
    for i in range(STUDENT_STEPS):
      state, metrics = step_fn(state, jnp.asarray(i, jnp.int32), setup.x_train, *arrays)
      losses.append(float(metrics["loss"]))
    runs[nd] = np.asarray(losses), jax.device_get(state)
  return initial, runs


@pytest.mark.eight_devices
def test_student_step_is_the_same_on_1_and_8_devices(student_runs):
  initial, runs = student_runs
  (losses1, state1), (losses8, state8) = runs[1], runs[8]
  assert np.all(np.isfinite(losses1)) and np.all(losses1 > 0)
  np.testing.assert_allclose(losses8, losses1, rtol=1e-5)
  assert jax.tree.structure(state8) == jax.tree.structure(state1)
  for a, b in zip(jax.tree.leaves(state1), jax.tree.leaves(state8)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)
  # Every parameter and BatchNorm statistic moved (a no-op step would compare equal trivially).
  for name in ("params", "batch_stats"):
    before, after = jax.tree.leaves(initial[name]), jax.tree.leaves(state1[name])
    assert before and all(np.any(a != b) for a, b in zip(before, after)), name


# ----------------------------------------------------------------------------- bad input


def test_presets_are_valid():
  muka.validate_config(CONFIGS.get_config("fmnist"))
  muka.validate_config(CONFIGS.get_config("fmnist,tiny"))
  assert CONFIGS.get_sweep() == [{"teachers.num_teachers": 2}, {"teachers.num_teachers": 4}]


@pytest.mark.parametrize(
  "overrides, match",
  [
    ({"teachers.num_teachers": 1}, r"teachers\.num_teachers=1 is invalid"),
    ({"muki.integration": "median"}, r"muki\.integration='median' is unknown; accepted: hard"),
    ({"muki.num_mc_samples": 0}, r"muki\.num_mc_samples=0 is invalid"),
    ({"variants": ("muki", "dfa")}, r"variants has unknown 'dfa'"),
    ({"model.dropout": 1.0}, r"model\.dropout=1\.0 is invalid"),
  ],
)
def test_validate_config_names_the_field(overrides, match):
  with pytest.raises(ValueError, match=match):
    muka.validate_config(tiny_config(**overrides))


def test_more_teachers_than_classes_is_refused():
  config = tiny_config(**{"teachers.num_teachers": 11})
  muka.validate_config(config)  # the class count is data-dependent
  with pytest.raises(ValueError, match=r"teachers\.num_teachers=11 is invalid for 10 classes"):
    muka.make_setup(config)


def test_unknown_domain_is_refused():
  with pytest.raises(ValueError, match=r"data\.domain='rot90' is not a domain"):
    muka.make_setup(tiny_config(**{"data.domain": "rot90"}))


def test_config_argument_errors():
  with pytest.raises(ValueError, match=r"preset='nope' is unknown; accepted: fmnist"):
    CONFIGS.get_config("nope")
  with pytest.raises(ValueError, match=r"flags \['huge'\] are unknown; accepted: tiny"):
    CONFIGS.get_config("fmnist,huge")


# ----------------------------------------------------------------------------- text


@pytest.mark.slow
def test_newsgroups_tiny_run_on_sentence_embeddings(tmp_path, monkeypatch):
  """The `newsgroups,tiny` preset end to end (fake archive, tiny random encoder, MLP heads)."""
  from moe_adapt import main as main_lib
  from tests.data import test_embedded

  data_dir = test_embedded.fake_newsgroups(tmp_path, monkeypatch)
  config = CONFIGS.get_config("newsgroups,tiny")
  config.data.options.base_options.data_dir = str(data_dir)
  config.data.options.base_options.tokenizer = str(data_dir / "tokenizer.json")
  results = main_lib.run(config, str(tmp_path / "run"))
  assert results["benchmark"] == "embedded" and results["target_domains"] == ["all"]
  # 4 train and 2 test documents for each of the 20 newsgroups; teachers on 10 each.
  assert results["num_examples"] == {"transfer": 80, "test": 40}
  assert results["teacher_classes"][0][0] == "alt.atheism"
  assert len(results["teacher_classes"][1]) == 10
  metrics = results["metrics"]
  assert set(metrics) == {*TRAINED, "teacher_0", "teacher_1"}
  for variant in TRAINED:
    assert set(metrics[variant]) == {"union", "subset_0", "subset_1", "mean"}
    acc = metrics[variant]["union"]["accuracy"]
    assert 0.0 <= acc <= 1.0 and round(acc * 40) == pytest.approx(acc * 40, abs=1e-6)
  assert (tmp_path / "run" / muka.CONFIDENCE_FILE).is_file()


def test_newsgroups_presets_are_valid():
  for arg in ("newsgroups", "newsgroups,tiny", "newsgroups,hetero"):
    config = CONFIGS.get_config(arg)
    muka.validate_config(config)
    assert config.data.benchmark == "embedded" and config.model.backbone == "mlp"
  assert CONFIGS.get_sweep("newsgroups") == CONFIGS.get_sweep("fmnist")
  hetero = CONFIGS.get_config("newsgroups,hetero").teachers.backbone_options
  assert [o["hidden_dim"] for o in hetero] == [0, 512]
  assert CONFIGS.get_sweep("newsgroups,hetero") == [{"teachers.num_teachers": 2}]
  with pytest.raises(ValueError, match=r"flag 'hetero' is invalid for preset='fmnist'"):
    CONFIGS.get_config("fmnist,hetero")


def test_heterogeneous_teachers_update_the_backbone_options():
  config = tiny_config(**{"teachers.backbone_options": ({"feature_dim": 4}, {"width": 2})})
  muka.validate_config(config)
  setup = muka.make_setup(config)
  first, second = (m.backbone for m in setup.teacher_models)
  assert (first.width, first.feature_dim) == (4, 4)
  assert (second.width, second.feature_dim) == (2, 8)
  assert setup.student_model.backbone.feature_dim == 8
  with pytest.raises(ValueError, match=r"teachers\.backbone_options has 1 entries for 2 teachers"):
    muka.make_setup(tiny_config(**{"teachers.backbone_options": ({"width": 2},)}))
  with pytest.raises(ValueError, match=r"teachers\.backbone_options=\('wide',\) is invalid"):
    muka.validate_config(tiny_config(**{"teachers.backbone_options": ("wide",)}))
