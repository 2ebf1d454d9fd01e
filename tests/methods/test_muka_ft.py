"""MUKA / MUKI with fine-tuned text teachers (`methods.muka_ft`, `configs/muka.py:newsgroups_ft`).

On the fake 20 Newsgroups archive with the tiny random BERT (2 blocks, 32 wide): the
split model equals the whole one, MC dropout vmapped over S equals S sequential passes,
the teachers' texts and the transfer set are disjoint, scores are computed once, the
chosen checkpoint is the best on validation, and bad input names its field.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_adapt.methods import muka_ft, muka_ft_setup
from moe_adapt.models import split_text_classifier as split_lib
from tests.methods.muka_util import CONFIGS, TRAINED


@pytest.fixture(scope="module")
def fake_data(tmp_path_factory):
  """The fake newsgroups archive and tokenizer (patched in for the whole module)."""
  from tests.data import test_embedded

  with pytest.MonkeyPatch.context() as patch:
    yield test_embedded.fake_newsgroups(tmp_path_factory.mktemp("muka_ft"), patch)


@pytest.fixture
def config(fake_data):
  c = CONFIGS.get_config("newsgroups_ft,tiny")
  c.data.options.data_dir = str(fake_data)
  c.data.options.tokenizer = str(fake_data / "tokenizer.json")
  return c


@pytest.fixture(scope="module")
def setup(fake_data):
  c = CONFIGS.get_config("newsgroups_ft,tiny")
  c.data.options.data_dir = str(fake_data)
  c.data.options.tokenizer = str(fake_data / "tokenizer.json")
  return muka_ft.with_hidden(muka_ft.make_setup(c), str(fake_data / "hidden_run"))


def _full(setup, k, variables):
  model = setup.teacher_models[k]
  full = split_lib.full_classifier(setup.encoder_config, model.num_classes, model.rate)
  lower = split_lib.lower_params(setup.encoder_params, setup.start)
  return full, split_lib.full_params(lower, variables["params"])


def _untrained(setup):
  import optax

  return [
    muka_ft.init_top(setup, m, jax.random.key(k), optax.adam(1e-3))
    for k, m in enumerate(setup.teacher_models)
  ]


def test_the_split_model_is_the_whole_network(setup):
  teacher = _untrained(setup)[0]
  full, params = _full(setup, 0, teacher)
  tokens = setup.tokens["transfer"].x
  whole = jax.jit(full.apply)({"params": params}, tokens[:, 0], tokens[:, 1])
  top = jax.jit(setup.teacher_models[0].apply)({"params": teacher["params"]}, setup.train.x)
  np.testing.assert_allclose(np.asarray(top), np.asarray(whole), rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # compiles the vmapped and the single pass: ~2 min at load 23 on 2 cores
def test_mc_dropout_vmapped_equals_sequential_passes(setup):
  teacher = _untrained(setup)[1]
  full, params = _full(setup, 1, teacher)
  tokens = jnp.asarray(setup.tokens["transfer"].x[:6])
  key, s = jax.random.key(7), 4
  got = muka_ft.mc_mean_probs(full, s, params, tokens, key)

  @functools.partial(jax.jit, static_argnums=0)
  def one_pass(model, drop_key):
    out = model.apply(
      {"params": params}, tokens[:, 0], tokens[:, 1], train=True, rngs={"dropout": drop_key}
    )
    return jax.nn.softmax(out)

  passes = [one_pass(full, k) for k in jax.random.split(key, s)]
  np.testing.assert_allclose(np.asarray(got), np.mean(passes, axis=0), rtol=1e-5, atol=1e-6)
  assert not np.allclose(passes[0], passes[1])  # dropout is on
  # Dropout runs inside the encoder too, not only before the head.
  no_head = split_lib.full_classifier(setup.encoder_config, full.num_classes, 0.0)
  a, b = (one_pass(no_head, k) for k in jax.random.split(key, 2))
  assert not np.allclose(a, b)


def test_teacher_texts_and_transfer_set_are_disjoint(setup):
  pool, transfer = setup.tokens["teacher"].x, setup.tokens["transfer"].x
  rows = {r.tobytes() for r in pool}
  assert not any(r.tobytes() in rows for r in transfer)
  assert len(pool) == len(transfer) == 2 * 20  # 2 texts per class each
  teacher_idx, transfer_idx = muka_ft_setup.disjoint_pools(np.repeat(np.arange(3), 5), 3, 2, 0)
  assert not set(teacher_idx) & set(transfer_idx)
  assert len(teacher_idx) == 6 and len(transfer_idx) == 9


@pytest.mark.slow  # the CLI run: ~2.5 min at load 20 on 2 cores, mostly compilation
def test_tiny_run_scores_once_and_selects_on_validation(config, tmp_path, monkeypatch):
  from moe_adapt import main as main_lib

  workdir = str(tmp_path / "run")
  results = main_lib.run(config, workdir)
  assert results["num_examples"] == {"teacher": 40, "transfer": 40, "val": 20, "test": 40}
  metrics = results["metrics"]
  assert set(metrics) == {*TRAINED, "teacher_0", "teacher_1"}
  for variant in TRAINED:
    chosen = results["selection"][variant]
    scores = chosen["scores"]
    assert set(scores) == {"step2", "step4"}
    assert chosen["val_accuracy"] == max(scores.values())
    assert scores[f"step{chosen['checkpoint_step']}"] == chosen["val_accuracy"]
    assert len(results["per_example"][variant]["union"]["correct"]) == 40
  diag = results["diagnostics"]
  assert 0.0 <= diag["mc"]["selects_owner"] <= 1.0 and len(diag["top_prob_on_others"]) == 2
  # A second run of the scores stage reads the file back, never recomputes.
  setup = muka_ft.with_hidden(muka_ft.make_setup(config), workdir)
  teachers = muka_ft.train_teachers(setup, workdir, None)
  first = muka_ft.teacher_scores(setup, teachers, workdir)

  def fail(*args, **kwargs):
    raise AssertionError("scores recomputed")

  monkeypatch.setattr(muka_ft, "compute_scores", fail)
  again = muka_ft.teacher_scores(setup, teachers, workdir)
  for name, value in first.items():
    np.testing.assert_array_equal(again[name], value)


@pytest.mark.parametrize(
  ("overrides", "match"),
  [
    ({"muki.num_mc_samples": 1}, r"muki\.num_mc_samples=1 is invalid with MC-dropout"),
    ({"model.train_layers": 0}, r"model\.train_layers"),
    ({"data.teacher_per_class": 0}, r"data\.teacher_per_class"),
    ({"teachers.backbone_options": ({"a": 1}, {"a": 2})}, r"teachers\.backbone_options"),
  ],
)
def test_validate_config_names_the_field(config, overrides, match):
  for name, value in overrides.items():
    config[name.split(".")[0]][name.split(".")[1]] = value
  with pytest.raises(ValueError, match=match):
    muka_ft.validate_config(config)


def test_one_mc_sample_is_fine_without_mc_variants(config):
  config.muki.num_mc_samples = 1
  config.variants = ("single_pass", "vanilla_kd", "oracle")
  muka_ft.validate_config(config)


@pytest.mark.parametrize(
  ("overrides", "match"),
  [
    # A label subset of 3 classes leaves one of 4 teachers without classes.
    (
      {"data.options.classes": ["alt.atheism", "sci.space", "rec.autos"]},
      r"teachers\.num_teachers=4 is invalid for 3 classes.*data\.options\.classes",
    ),
    ({"data.teacher_per_class": 4}, r"data\.teacher_per_class=4 leaves class 0"),
    ({"model.train_layers": 3}, r"model\.train_layers=3 is invalid for an encoder of 2 blocks"),
  ],
)
def test_make_setup_names_the_field(config, overrides, match):
  config.teachers.num_teachers = 4
  for name, value in overrides.items():
    *path, last = name.split(".")
    node = config
    for p in path:
      node = node[p]
    node[last] = value
  with pytest.raises(ValueError, match=match):
    muka_ft.make_setup(config)
