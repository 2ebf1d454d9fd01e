"""Tests of moe_adapt.recipes.cotuned_teachers and configs/recipes/cotuned_teachers.py.

- End to end through the CLI (the tiny preset), twice with the same seed: every reported
  variant, accuracies k / N over the union, identical results (determinism).
- In process: the teachers' label sets are disjoint and their union is the student's label
  space, in teacher order; teacher tasks are the union task restricted and relabelled; the
  seed draws the labeled subset; a co_tuning teacher seen as muka's dropout classifier gives
  the same logits; the student predicts over the union.
- Bad inputs, each one ValueError naming the field.
"""

import importlib.util
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

from moe_adapt import data, models
from moe_adapt.methods import co_tuning, co_tuning_data, muka
from moe_adapt.recipes import cotuned_teachers as recipe
from moe_adapt.recipes import cotuned_teachers_stages as stages
from tests.methods import configs_util
from tests.subprocess_util import xla_flags

REPO = pathlib.Path(__file__).resolve().parents[2]
CLI_TIMEOUT_S = 600


def _config_module():
  path = REPO / "configs" / "recipes" / "cotuned_teachers.py"
  spec = importlib.util.spec_from_file_location("_cotuned_teachers_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


CONFIGS = _config_module()


def tiny_config(**overrides) -> ml_collections.ConfigDict:
  """The tiny config with dotted-key overrides, e.g. `**{"student.init": "scratch"}`."""
  config = CONFIGS.get_config("fmnist,tiny")
  for name, value in overrides.items():
    *groups, field = name.split(".")
    node = config
    for group in groups:
      node = node[group]
    node[field] = value
  return config


# ----------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
  """Two tiny CLI runs with seed 0 (sharing the compilation cache, not the workdir)."""
  tmp = tmp_path_factory.mktemp("cotuned_cli")
  env = dict(
    os.environ,
    XLA_FLAGS=xla_flags(1),
    JAX_PLATFORMS="cpu",
    JAX_COMPILATION_CACHE_DIR=str(tmp / "jax_cache"),
    # Every program, however small: the second run compiles nothing.
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1",
  )
  out = []
  for name in ("a", "b"):
    proc = subprocess.run(
      [
        sys.executable,
        "-m",
        "moe_adapt.main",
        "--config=configs/recipes/cotuned_teachers.py:fmnist,tiny",
        f"--workdir={tmp / name}",
      ],
      cwd=REPO,
      env=env,
      capture_output=True,
      text=True,
      timeout=CLI_TIMEOUT_S,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out.append(json.loads((tmp / name / "results.json").read_text()))
  return out


@pytest.mark.slow
def test_cli_reports_every_variant(cli_runs):
  results = cli_runs[0]
  assert results["method"] == "cotuned_teachers"
  assert results["target_domains"] == ["rot45"]
  assert results["teacher_classes"] == [["Dress", "Coat"], ["Shirt", "Ankle boot"]]
  expected = {"union_fine_tune", "union_co_tuning_direct", "oracle", "oracle_all"}
  for t in ("co_tuning_direct", "fine_tune"):
    expected |= {f"teacher_0_{t}", f"teacher_1_{t}", f"teachers_concat_{t}"}
    expected |= {f"{s}_from_{t}" for s in ("muki", "vanilla_kd")}
  metrics = results["metrics"]
  assert set(metrics) == expected
  n_test = results["num_examples"]["test"]
  for name, m in metrics.items():
    acc = m["mean"]["accuracy"]
    assert 0.0 <= acc <= 1.0, name
    if not name.startswith("teacher_"):
      assert m["rot45"]["accuracy"] == acc
      assert round(acc * n_test) == pytest.approx(acc * n_test, abs=1e-6)  # k / N
    if name.endswith(("_from_co_tuning_direct", "_from_fine_tune")) or name.startswith("oracle"):
      assert m["union"]["accuracy"] == acc
      assert {"subset_0", "subset_1"} <= set(m)
  assert set(metrics["teacher_1_fine_tune"]) == {"subset_1", "mean"}
  configs_util.check_per_example(results, expected)
  labeled = results["num_examples"]["labeled_per_teacher"]
  assert sum(labeled) == results["num_examples"]["labeled"]
  for diag in results["confidences"].values():
    assert 0.0 <= diag["mc_selects_owner"] <= 1.0 and len(diag["mc_mean"]) == 2


@pytest.mark.slow
def test_cli_is_deterministic_for_a_seed(cli_runs):
  a, b = cli_runs
  assert a["metrics"] == b["metrics"]
  assert a["confidences"] == b["confidences"]


# ----------------------------------------------------------------------------- in process


@pytest.fixture(scope="module")
def tiny_setup():
  return recipe.make_setup(tiny_config())


def _images_key(x: np.ndarray) -> set:
  return {row.tobytes() for row in np.asarray(x).reshape(len(x), -1)}


def test_label_sets_are_disjoint_and_cover_the_union(tiny_setup):
  setup = tiny_setup
  union_task = setup.union.task
  assert union_task.target_names == ("Dress", "Coat", "Shirt", "Ankle boot")
  assert setup.chunks == ((0, 1), (2, 3))
  names = [t.task.target_names for t in setup.teachers]
  assert names == [("Dress", "Coat"), ("Shirt", "Ankle boot")]
  assert not set(names[0]) & set(names[1])
  assert [n for ns in names for n in ns] == list(union_task.target_names)
  # The teachers' labeled images partition the union's labeled subset.
  keys = [_images_key(t.task.target_train.x) for t in setup.teachers]
  assert not keys[0] & keys[1]
  assert keys[0] | keys[1] == _images_key(union_task.target_train.x)
  for t, chunk in zip(setup.teachers, setup.chunks):
    for part in ("target_train", "target_val", "target_test"):
      mine, full = getattr(t.task, part), getattr(union_task, part)
      np.testing.assert_array_equal(mine.y, full.y[np.isin(full.y, chunk)] - chunk[0])
      np.testing.assert_array_equal(mine.x, full.x[np.isin(full.y, chunk)])


def test_student_predicts_over_the_union(tiny_setup):
  st = tiny_setup.student
  assert st.student_model.num_classes == 4
  assert [m.num_classes for m in st.teacher_models] == [2, 2]
  assert st.teacher_models[0].rate == 0.1
  np.testing.assert_array_equal(np.unique(st.train.y), np.arange(4))
  np.testing.assert_array_equal(st.test.y, tiny_setup.union.task.target_test.y)
  # The transfer set holds the labeled subset.
  assert _images_key(tiny_setup.union.task.target_train.x) <= _images_key(st.train.x)


def test_seed_draws_the_labeled_subset(tiny_setup):
  again = recipe.make_setup(tiny_config())
  other = recipe.make_setup(tiny_config(seed=3))
  train = tiny_setup.union.task.target_train
  np.testing.assert_array_equal(again.union.task.target_train.x, train.x)
  assert _images_key(other.union.task.target_train.x) != _images_key(train.x)
  np.testing.assert_array_equal(np.bincount(other.union.task.target_train.y), np.bincount(train.y))


@pytest.mark.slow
def test_teacher_as_dropout_classifier_gives_the_target_head_logits(tiny_setup):
  t_setup, st = tiny_setup.teachers[1], tiny_setup.student
  init = co_tuning.init_source(t_setup, co_tuning.make_optimizer(t_setup.config))
  source = {"params": init["params"], "batch_stats": init["batch_stats"]}
  start = co_tuning.finetune_start(t_setup, source)
  state = {"params": start, "batch_stats": source["batch_stats"]}
  x = t_setup.task.target_test.x[:5]
  feats = t_setup.source_model.apply(
    {"params": {"backbone": start["backbone"]}, "batch_stats": state["batch_stats"]},
    x,
    train=False,
    method=models.Classifier.features,
  )
  expected = feats @ start["target_head"]["kernel"] + start["target_head"]["bias"]
  got = st.teacher_models[1].apply(stages.teacher_variables(state), x, train=False)
  np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-5, atol=1e-6)
  # Teachers draw their own head initialisation (not the union's, not each other's).
  other = co_tuning.finetune_start(tiny_setup.teachers[0], source)["target_head"]["kernel"]
  assert not np.allclose(other, start["target_head"]["kernel"])


def test_restrict_task_restricts_and_relabels():
  x = np.arange(6, dtype=np.float32).reshape(6, 1, 1, 1)
  split = data.Split(x, np.array([0, 3, 2, 1, 3, 0], np.int32))
  task = co_tuning.Task(
    source_domain="s",
    target_domain="t",
    source_names=("a",),
    target_names=("c0", "c1", "c2", "c3"),
    source_train=None,
    source_val=None,
    source_test=None,
    target_train=split,
    target_val=data.Split(x[:0], np.zeros(0, np.int32)),
    target_test=split,
    input_shape=(1, 1, 1),
  )
  sub = co_tuning_data.restrict_task(task, (2, 3))
  assert sub.target_names == ("c2", "c3")
  np.testing.assert_array_equal(sub.target_train.y, [1, 0, 1])
  np.testing.assert_array_equal(sub.target_train.x.ravel(), [1, 2, 4])
  assert len(sub.target_val.y) == 0


def test_oracle_targets_are_the_labels(tiny_setup):
  x, t = stages.oracle_targets(tiny_setup, "oracle")
  y = tiny_setup.union.task.target_train.y
  assert x.shape[0] == len(y)
  np.testing.assert_array_equal(np.argmax(t["targets"], -1), y)
  np.testing.assert_array_equal(t["targets"].sum(-1), np.ones(len(y)))
  x_all, t_all = stages.oracle_targets(tiny_setup, "oracle_all")
  assert x_all.shape[0] == len(tiny_setup.student.train.y) == len(t_all["weights"])


def test_student_start_from_source_keeps_the_backbone(tiny_setup):
  import optax

  init = co_tuning.init_source(tiny_setup.union, optax.adam(1e-3))
  source = {"params": init["params"], "batch_stats": init["batch_stats"]}
  start = stages.student_start(tiny_setup, source, optax.adam(1e-3))
  same = jax.tree.map(
    lambda a, b: bool(jnp.array_equal(a, b)),
    start["params"]["backbone"],
    source["params"]["backbone"],
  )
  assert all(jax.tree.leaves(same))
  assert start["params"]["head"]["kernel"].shape[-1] == 4


def test_muka_scores_shapes(tiny_setup):
  st = tiny_setup.student
  assert isinstance(st, muka.Setup)
  owner = stages.owner_rate(tiny_setup, np.tile([[1.0, 0.0]], (len(st.train.y), 1)))
  assert owner == pytest.approx(np.mean(np.isin(st.train.y, (0, 1))))


# ----------------------------------------------------------------------------- configs, errors


@pytest.mark.parametrize("arg", ["fmnist", "fmnist,tiny"])
def test_presets_are_valid(arg):
  recipe.validate_config(CONFIGS.get_config(arg))


def test_config_argument_errors():
  with pytest.raises(ValueError, match="preset='cub' is unknown; accepted: fmnist"):
    CONFIGS.get_config("cub")
  with pytest.raises(ValueError, match="flags"):
    CONFIGS.get_config("fmnist,huge")


@pytest.mark.parametrize(
  "name, value, match",
  [
    ("teachers.label_sets", ((3, 4), (4, 9)), r"teachers.label_sets=.*lists class 4 twice"),
    ("teachers.label_sets", ((3, 4, 6, 9),), r"teachers.label_sets=.*< 2 label sets"),
    ("teachers.label_sets", ((3, 4), ()), r"teachers.label_sets\[1\]=\(\) is invalid"),
    ("teachers.label_sets", ((3, -4), (6,)), r"teachers.label_sets\[0\]=.*indices >= 0"),
    ("teachers.label_sets", ((3, 4), "69"), r"teachers.label_sets\[1\]='69' is invalid"),
    ("teachers.variants", ("co_tuning_sideways",), r"teachers.variants has unknown"),
    ("teachers.variants", (), r"teachers.variants=\(\) is invalid"),
    ("union.variants", ("l3_sp",), r"union.variants has unknown 'l3_sp'"),
    ("student.variants", ("muki", "dfa"), r"student.variants has unknown 'dfa'"),
    ("student.init", "imagenet", r"student.init='imagenet' is unknown; accepted: source"),
    ("teachers.dropout", 1.0, r"teachers.dropout=1.0 is invalid"),
    ("student.dropout", -0.1, r"student.dropout=-0.1 is invalid"),
    ("data.transfer_per_class", -1, r"data.transfer_per_class=-1 is invalid"),
    ("student.steps", 0, r"student.steps=0 is invalid"),
    ("student.lr", 0.0, r"student.lr=0.0 is invalid"),
    ("muki.integration", "mean", r"muki.integration='mean' is unknown"),
    ("vanilla_kd.temperature", 0.0, r"vanilla_kd.temperature=0.0 is invalid"),
    ("finetune.lr", 0.0, r"finetune.lr=0.0 is invalid"),  # a field shared with co_tuning
    ("data.sampling_rate", 1.5, r"data.sampling_rate=1.5 is invalid"),
  ],
)
def test_validate_config_names_the_bad_field(name, value, match):
  with pytest.raises(ValueError, match=match):
    recipe.validate_config(tiny_config(**{name: value}))


def test_make_setup_names_a_class_beyond_the_benchmark():
  with pytest.raises(ValueError, match=r"teachers.label_sets has class\(es\) \[12\]"):
    recipe.make_setup(tiny_config(**{"teachers.label_sets": ((3, 4), (6, 12))}))


def test_make_setup_names_an_unknown_target_domain():
  with pytest.raises(ValueError, match=r"data.target_domain='rot33' is not a domain"):
    recipe.make_setup(tiny_config(**{"data.target_domain": "rot33"}))


def test_method_is_registered():
  from moe_adapt import methods

  assert methods.get_method("cotuned_teachers") is recipe
