"""Meta-DMoE on the streaming path (`data.streaming=True`, `methods/meta_dmoe_stream.py`).

On the DomainNet-format mock from the `resnet_tiny` fixture (as
test_meta_dmoe_checkpoint.py): the streamed splits hold the in-memory benchmark's examples;
the experts' tokens computed inside a step equal `meta_dmoe.expert_features` on the same
images; the meta stage's episode plan is a function of (seed, step) and a fresh reader
resumes it; bad input is named; and (slow) the tiny preset runs through the CLI, and a run
killed after the experts stage and inside the meta stage ends with the uninterrupted run's
results.json.
"""

import dataclasses
import json
import os
import pathlib
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from moe_adapt import data, methods
from moe_adapt.data import tfds_builders
from moe_adapt.methods import meta_dmoe, meta_dmoe_stream
from tests.methods import configs_util

REPO = pathlib.Path(__file__).resolve().parents[2]
HF = REPO / "tests" / "models" / "fixtures" / "hf"
CONFIGS = configs_util.config_module("meta_dmoe")


@pytest.fixture(scope="module")
def mock_domainnet(tmp_path_factory):
  """A DomainNet-format mock: 3 domains × 3 classes, 12 train + 4 test images per class."""
  root = tmp_path_factory.mktemp("mockdn_stream")
  builder = tfds_builders.prepare_mock(
    "domainnet", root, per_class={"train": 12, "test": 4}, image_sides=(24, 40)
  )
  return f"{builder.name}/{builder.builder_config.name}", str(root)


def stream_tiny(mock, **overrides):
  """`meta_dmoe.py:tfds,tiny` with data.streaming on the mock, from the fixture checkpoint."""
  name, root = mock
  config = CONFIGS.get_config("tfds,tiny")
  config.data.streaming = True
  config.data.options.tfds_name = name
  config.data.options.data_dir = root
  config.backbone.checkpoint = str(HF / "resnet_tiny")
  return configs_util.with_overrides(config, **overrides)


@pytest.fixture(scope="module")
def setup(mock_domainnet):
  return meta_dmoe_stream.make_setup(stream_tiny(mock_domainnet))


def test_the_streamed_splits_hold_the_in_memory_examples(setup, mock_domainnet):
  assert isinstance(setup, meta_dmoe_stream.StreamSetup) and setup.x is None  # no images
  config = stream_tiny(mock_domainnet)
  options = {k: v for k, v in config.data.options.items() if v != ""}
  splits = data.get_benchmark("tfds", **options).load(seed=config.seed)
  for domain, parts in setup.domain_sources.items():
    for source, split in zip(parts, splits[domain], strict=True):
      labels = [source.data[int(i)]["label"] for i in source.indices]
      np.testing.assert_array_equal(labels, split.y)  # same examples, same order
    whole = parts.whole()
    assert len(whole.indices) == len(meta_dmoe.whole_domain(splits[domain])[1])
  assert setup.num_source_train == sum(len(splits[d].train.y) for d in setup.sources)


@pytest.mark.slow  # 35-71 s wall at load 20-25 on 2 cores: two compiles of the features
def test_tokens_in_the_step_equal_expert_features(setup):
  tx = optax.adam(1e-3)
  backbone = meta_dmoe.train_backbone(setup.config, "unused", setup, writer=None)
  experts = meta_dmoe.init_experts(setup, tx, backbone)
  # Make the experts differ, so that a wrong expert order would show.
  experts["params"] = jax.tree.map(
    lambda a: a * (1 + 0.1 * jnp.arange(a.shape[0]).reshape(-1, *[1] * (a.ndim - 1))),
    experts["params"],
  )
  stream = setup.stream(setup.pooled(setup.sources), 16, 99)
  batch = stream(0)
  in_step = jax.jit(lambda e, x: meta_dmoe.expert_tokens(setup, e, x))(experts, batch["image"])
  cached = meta_dmoe.expert_features(setup, experts, batch["image"])  # [E, B, D]
  np.testing.assert_allclose(in_step, jnp.swapaxes(cached, 0, 1), rtol=1e-5, atol=1e-6)
  # The streamed batch is the examples it names.
  source = setup.pooled(setup.sources)
  assert set(batch["index"].tolist()) <= set(source.indices.tolist())
  labels = [source.data[int(i)]["label"] for i in batch["index"]]
  np.testing.assert_array_equal(batch["label"], labels)


def _in_memory_twin(setup):
  """`setup` as an in-memory Setup whose splits are the streamed examples through the
  evaluation transform (the same images both paths evaluate)."""
  rng = np.random.default_rng(0)

  def read(source):
    rows = [setup.eval_transform(source.data[int(i)], rng) for i in source.indices]
    return data.Split(np.stack([r["image"] for r in rows]), np.array([r["label"] for r in rows]))

  splits = {d: data.DomainSplits(*map(read, parts)) for d, parts in setup.domain_sources.items()}
  return dataclasses.replace(setup, splits=splits)


@pytest.mark.slow  # 87-92 s wall at load 20-25 on 2 cores: both evaluations compile
def test_streamed_evaluation_equals_the_in_memory_one_on_the_same_images(setup):
  tx = optax.adam(1e-3)
  backbone = meta_dmoe.train_backbone(setup.config, "unused", setup, writer=None)
  experts = meta_dmoe.init_experts(setup, tx, backbone)
  experts = {"params": experts["params"], "batch_stats": experts["batch_stats"]}
  tokens = jnp.zeros((1, setup.num_experts, 16))
  aggregator = jax.jit(setup.agg_model.init)(setup.key("init"), tokens)["params"]
  student = {**backbone, "opt_state": tx.init(backbone["params"])}
  meta = {"student": backbone["params"], "aggregator": aggregator, **backbone}
  meta["batch_stats"] = backbone["batch_stats"]
  candidates = {"meta": [(4, meta)], "erm_continued": [(4, backbone)]}
  streamed: dict = {}
  metrics = meta_dmoe_stream.evaluate(
    setup, experts, aggregator, student, candidates, details=streamed
  )
  in_memory: dict = {}
  expected = meta_dmoe.evaluate(
    _in_memory_twin(setup),
    experts,
    aggregator,
    student,
    meta,
    candidates=candidates,
    details=in_memory,
  )
  assert streamed["per_example"] == in_memory["per_example"]
  assert streamed["selection"] == in_memory["selection"]
  assert metrics == expected


def test_the_episode_plan_is_seeded_and_resumes_from_the_step(setup):
  plan = meta_dmoe_stream.EpisodePlan.make(0, 3, 40)
  again = meta_dmoe_stream.EpisodePlan.make(0, 3, 40)
  np.testing.assert_array_equal(plan.domain, again.domain)
  assert set(plan.domain.tolist()) == {0, 1, 2}
  assert not np.array_equal(plan.domain, meta_dmoe_stream.EpisodePlan.make(1, 3, 40).domain)
  for t in range(40):  # each domain's stream is read in order
    assert plan.position[t] == np.sum(plan.domain[:t] == plan.domain[t])
  episodes = meta_dmoe_stream.EpisodeStreams(setup)
  run = [episodes(t) for t in range(4)]
  resumed = meta_dmoe_stream.EpisodeStreams(setup)  # as after a restart at step 2
  for t in (2, 3):
    domain, batch = resumed(t)
    assert domain == run[t][0]
    np.testing.assert_array_equal(batch["index"], run[t][1]["index"])
    np.testing.assert_array_equal(batch["image"], run[t][1]["image"])
  size = setup.config.meta.support_size + setup.config.meta.query_size
  for domain, batch in run:  # single-domain episodes of S + Q examples
    own = setup.domain_sources[setup.sources[domain]].train.indices
    assert len(batch["index"]) == size and set(batch["index"].tolist()) <= set(own.tolist())


def test_bad_input_is_named(mock_domainnet):
  digits = CONFIGS.get_config("digits_rot,tiny")
  digits.data.streaming = True
  with pytest.raises(ValueError, match=r"data\.streaming=True needs data\.benchmark='tfds'"):
    meta_dmoe_stream.validate_config(digits)
  with pytest.raises(ValueError, match=r"data\.augment has unknown name\(s\) \['blur'\]"):
    meta_dmoe_stream.validate_config(
      stream_tiny(mock_domainnet, **{"data.augment": ("flip", "blur")})
    )
  with pytest.raises(ValueError, match=r"data\.eval_augment=.* sizes the image twice"):
    meta_dmoe_stream.validate_config(
      stream_tiny(mock_domainnet, **{"data.eval_augment": ("resize", "center_crop")})
    )
  with pytest.raises(ValueError, match=r"domain_key='site' is not a feature of .*accepted: "):
    meta_dmoe_stream.make_setup(stream_tiny(mock_domainnet, **{"data.options.domain_key": "site"}))
  with pytest.raises(ValueError, match=r"data\.streaming=True is the streaming path: run it with"):
    meta_dmoe.make_setup(stream_tiny(mock_domainnet))  # the in-memory entry point


def test_the_method_name_resolves_to_both_paths(mock_domainnet):
  assert methods.get_method("meta_dmoe") is meta_dmoe_stream
  in_memory = CONFIGS.get_config("digits_rot,tiny")
  assert type(meta_dmoe_stream.make_setup(in_memory)) is meta_dmoe.Setup


def _cli(mock, workdir, *, kill_at=None, cache=None) -> subprocess.CompletedProcess:
  name, root = mock
  env = {
    **os.environ,
    "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
    "JAX_PLATFORMS": "cpu",
  }
  env.pop("MOE_ADAPT_KILL_AT", None)
  if kill_at:
    env["MOE_ADAPT_KILL_AT"] = kill_at
  if cache:
    env["JAX_COMPILATION_CACHE_DIR"] = str(cache)
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  return subprocess.run(
    [
      sys.executable,
      "-m",
      "tests.kill_at",
      "--config=configs/meta_dmoe.py:tfds,tiny",
      "--config.data.streaming=True",
      f"--config.backbone.checkpoint={HF / 'resnet_tiny'}",
      f"--config.data.options.tfds_name={name}",
      f"--config.data.options.data_dir={root}",
      f"--workdir={workdir}",
    ],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=1200,
  )


def _results(workdir: pathlib.Path) -> dict:
  results = json.loads((workdir / "results.json").read_text())
  return {k: v for k, v in results.items() if k not in ("wall_time_s", "step_time_s")}


@pytest.mark.slow
def test_streaming_preset_runs_and_resumes_to_the_same_results(mock_domainnet, tmp_path):
  """The tiny streaming preset through the CLI, uninterrupted and SIGKILLed twice."""
  cache = tmp_path / "xla_cache"
  ref = _cli(mock_domainnet, tmp_path / "ref", cache=cache)
  assert ref.returncode == 0, ref.stderr[-3000:]
  results = _results(tmp_path / "ref")
  assert results["source_domains"] == ["clipart", "infograph"]
  assert results["target_domains"] == ["painting"]
  assert results["streaming"]["augment"] == ["random_resized_crop", "flip"]
  expected = {"erm", "erm_continued", "expert_average", "meta_dmoe", "aggregator_pretrained"}
  assert expected <= set(results["metrics"]) and set(results["per_example"]) == set(
    results["metrics"]
  )
  assert set(results["selection"]) == {"meta_dmoe", "aggregator_pretrained", "erm_continued"}
  for variant, metrics in results["metrics"].items():
    entry = results["per_example"][variant]["painting"]
    assert len(entry["correct"]) == 48  # the whole target domain: 3 classes x (12 + 4) images
    draws = entry.get("correct_draws", [entry["correct"]])
    assert metrics["painting"]["accuracy"] == pytest.approx(np.mean(draws)), variant

  # Killed right after the experts stage's last checkpoint, then inside the meta stage.
  chain = tmp_path / "chain"
  for kill_at in ("save:experts:4", "save:meta:2"):
    killed = _cli(mock_domainnet, chain, kill_at=kill_at, cache=cache)
    assert killed.returncode == -signal.SIGKILL, (kill_at, killed.stderr[-3000:])
    assert not (chain / "results.json").exists()
  done = _cli(mock_domainnet, chain, cache=cache)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "stage 'experts'" in done.stderr
  assert _results(chain) == results
