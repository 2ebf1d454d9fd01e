"""The catalogue of bad inputs: each one rejected early with one clear message.

One row per bad input, on the four surfaces a user meets: the CLI, configs, data and the
core functions. Each row names how the input is given and a regex of the expected message,
which names the offending field and what is accepted. The README's Reliability section
lists the same rows.

- CLI rows run `python -m moe_adapt.main` (all at once, as the module starts) and expect
  exit code 2, exactly one stderr line `moe-adapt: error: ...`, no traceback and no workdir.
- Config and workdir rows go through `moe_adapt.main.run` (what the CLI calls) with the
  method's `run` replaced by a function that fails the test, and expect one ValueError
  before anything is written (for config rows: the workdir is never created).
- Data and core rows call the public function and expect one ValueError.
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from moe_adapt import core, data, methods, recipes  # noqa: F401  (registers the recipes)
from moe_adapt import main as main_lib
from moe_adapt.methods import adapter_soup
from moe_adapt.train import workdir as workdir_lib
from tests.methods import configs_util

REPO = pathlib.Path(__file__).resolve().parents[1]
MD_TINY = "configs/meta_dmoe.py:digits_rot,tiny"

# ----------------------------------------------------------------------------- CLI rows

CLI_CASES = {
  "cli_unknown_preset": (
    ["--config=configs/meta_dmoe.py:nope"],
    r"benchmark='nope' is unknown; accepted: digits_rot, fmnist_rot",
  ),
  "cli_missing_config_file": (
    ["--config=configs/nope.py"],
    r"--config=configs/nope\.py cannot be loaded \(.*No such file.*\); "
    r"accepted: a Python file defining get_config\(arg\)",
  ),
  "cli_malformed_override": (
    [f"--config={MD_TINY}", "--config.seed=abc"],
    r"--config\.seed=abc: invalid literal for int\(\)",
  ),
  "cli_wrong_type_override": (
    [f"--config={MD_TINY}", "--config.experts.lr=fast"],
    r"--config\.experts\.lr=fast: could not convert string to float",
  ),
  "cli_unknown_override_key": (
    [f"--config={MD_TINY}", "--config.experts.nope=1"],
    r"--config\.experts\.nope names no field of the config: experts has no 'nope'; "
    r"accepted: batch_size, lr, mesh_shape, num_experts",
  ),
  "cli_out_of_range_value": (
    [f"--config={MD_TINY}", "--config.experts.steps=0"],
    r"experts\.steps=0 is invalid; accepted: an integer >= 1",
  ),
}


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
  """id -> (exit code, stderr, workdir) of every CLI row, run side by side."""
  base = tmp_path_factory.mktemp("bad_cli")
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
  procs = {}
  for case_id, (args, _) in CLI_CASES.items():
    workdir = base / case_id
    procs[case_id] = (
      subprocess.Popen(
        [sys.executable, "-m", "moe_adapt.main", *args, f"--workdir={workdir}"],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
      ),
      workdir,
    )
  out = {}
  for case_id, (proc, workdir) in procs.items():
    _, stderr = proc.communicate(timeout=300)
    out[case_id] = (proc.returncode, stderr, workdir)
  return out


@pytest.mark.parametrize("case_id", list(CLI_CASES))
def test_cli_rejects_bad_input_in_one_line(cli_runs, case_id):
  returncode, stderr, workdir = cli_runs[case_id]
  assert returncode == 2, stderr[-3000:]
  assert "Traceback" not in stderr
  # absl may log INFO lines first; the error is the last line, and the only error line.
  errors = [line for line in stderr.splitlines() if line.startswith("moe-adapt: error: ")]
  assert len(errors) == 1 and stderr.strip().endswith(errors[0]), stderr[-3000:]
  assert re.search(CLI_CASES[case_id][1], errors[0]), errors[0]
  assert not workdir.exists()


# ----------------------------------------------------------------------------- configs

_MODULES = {}


def config(name: str, arg: str, **overrides) -> ml_collections.ConfigDict:
  """`configs/<name>.py:<arg>` with dotted-key overrides."""
  if name not in _MODULES:
    _MODULES[name] = configs_util.config_module(name)
  return configs_util.with_overrides(_MODULES[name].get_config(arg), **overrides)


def with_field(cfg: ml_collections.ConfigDict, group: str, **fields) -> ml_collections.ConfigDict:
  """`cfg` with `cfg.<group>` rebuilt holding `fields` of any type (as a config file may set
  them: overrides are type-checked by ml_collections, a config file is not)."""
  cfg[group] = ml_collections.ConfigDict({**cfg[group].to_dict(), **fields})
  return cfg


MD = ("meta_dmoe", "digits_rot,tiny")
CO = ("co_tuning", "fmnist,tiny")
MU = ("muka", "fmnist,tiny")
FT = ("finetune", "digits,tiny")
AM = ("adamix", "digits,tiny")
AS = ("adapter_soup", "digits,tiny")
CT = ("recipes/cotuned_teachers", "fmnist,tiny")

# id -> (config builder, expected message).
CONFIG_CASES = {
  "config_unknown_method": (
    lambda: config(*MD, method="nope"),
    r"method='nope' is unknown; accepted: adamix, .*meta_dmoe, muka",
  ),
  "config_wrong_type": (
    lambda: with_field(config(*MD), "experts", lr="1e-3"),
    r"experts\.lr='1e-3' is invalid; accepted: a number > 0",
  ),
  "config_lr_not_positive": (
    lambda: config(*CO, **{"finetune.lr": 0.0}),
    r"finetune\.lr=0\.0 is invalid; accepted: a number in \(0, ",
  ),
  "config_zero_steps": (
    lambda: config(*MU, **{"teachers.steps": 0}),
    r"teachers\.steps=0 is invalid; accepted: an integer >= 1",
  ),
  "config_checkpoint_every_zero": (
    lambda: config(*CO, checkpoint_every=0),
    r"checkpoint_every=0 is invalid; accepted: an integer >= 1",
  ),
  "config_top_k_above_adapters": (
    lambda: config(*AS, **{"selection.top_k": 7}),
    r"selection\.top_k=7 exceeds the 6 adapters \(rot0, .*\); accepted: 1\.\.6",
  ),
  "config_more_experts_than_domains": (
    lambda: config(*MD, **{"experts.num_experts": 9}),
    r"experts\.num_experts=9 exceeds the number of source domains \(5: .*\); accepted: 1\.\.5",
  ),
  "config_more_teachers_than_classes": (
    lambda: config(*MU, **{"teachers.num_teachers": 11}),
    r"teachers\.num_teachers=11 is invalid for 10 classes; accepted: an integer in \[2, 10\]",
  ),
  "config_teacher_overlap_too_large": (
    lambda: config(*MU, **{"teachers.overlap": 5}),
    r"teachers\.overlap=5 is invalid for 10 classes and 2 teachers; accepted: an integer in "
    r"\[0, 4\]",
  ),
  "config_target_is_a_source": (
    lambda: config(*MD, **{"data.source_domains": ("rot0", "rot75")}),
    r"target_domains \['rot75'\] are also in source_domains; a target domain must be held out",
  ),
  "config_same_domain_shared_classes": (
    lambda: config(*CO, **{"data.target_domain": "rot0", "data.target_classes": (3, 0)}),
    r"data\.source_domain and data\.target_domain are both 'rot0' and .* share class\(es\) \[0\].*"
    r"accepted: another target domain or disjoint classes",
  ),
  "config_support_larger_than_domain": (
    lambda: config(*MD, **{"adapt.support_size": 100000}),
    r"adapt\.support_size=100000 exceeds target domain 'rot75' \(\d+ unlabeled examples\); "
    r"accepted: at most \d+",
  ),
  "config_unknown_adapter_kind": (
    lambda: config(*AS, **{"adapter.kind": "nope"}),
    r"adapter\.kind='nope' is unknown; accepted: pfeiffer, houlsby, lora",
  ),
  "config_unknown_variant": (
    lambda: config(*AM, variants=("adamix", "nope")),
    r"variants has unknown 'nope'; accepted: adapter, adamix, ",
  ),
  # A comparison without the variant its paired differences are measured against.
  "config_baseline_not_run": (
    lambda: config(*CO, variants=("l2_sp", "co_tuning_direct")),
    r"variants=\('l2_sp', 'co_tuning_direct'\) compares 2 variants without 'fine_tune', the "
    r"baseline their paired differences are measured against; accepted: a list that includes "
    r"'fine_tune', or a single variant",
  ),
  "config_recipe_baseline_not_run": (
    lambda: config(*CT, **{"student.variants": ("muki", "oracle")}),
    r"student\.variants=\('muki', 'oracle'\) compares 2 variants without 'vanilla_kd'",
  ),
  "config_unknown_protocol": (
    lambda: config(*FT, **{"data.protocol": "nope"}),
    r"data\.protocol='nope' is unknown; accepted: lodo, pooled",
  ),
  "config_too_many_devices": (
    lambda: config(*FT, num_devices=99),
    r"num_devices=99 exceeds the \d+ available cpu devices",
  ),
  # Data through the config: checked by make_setup, before the workdir is touched.
  "data_unknown_domain": (
    lambda: config(*MU, **{"data.domain": "rot99"}),
    r"data\.domain='rot99' is not a domain of benchmark 'fmnist_rot'; accepted: rot0, rot15",
  ),
  "data_empty_class_after_sampling": (
    lambda: config(*CO, **{"data.sampling_rate": 1e-6}),
    r"data\.sampling_rate=1e-06 leaves target class 'Dress' with no training example .*; "
    r"accepted: a sampling rate >= ",
  ),
  "data_missing_fashion_mnist_files": (
    lambda: config(*CO, **{"data.options.data_dir": "/nonexistent/moe_adapt_empty"}),
    r"data_dir='/nonexistent/moe_adapt_empty' does not hold the Fashion-MNIST IDX files "
    r"\(missing: train-images-idx3-ubyte",
  ),
}


@pytest.fixture
def no_method_run(monkeypatch):
  """Every method's `run` fails the test: a bad input must be refused before it."""

  def must_not_run(*args, **kwargs):
    raise AssertionError("the bad input was accepted: the method ran")

  for name in methods.list_methods():
    monkeypatch.setattr(methods.get_method(name), "run", must_not_run)


@pytest.mark.parametrize("case_id", list(CONFIG_CASES))
def test_bad_config_is_refused_before_the_workdir_is_touched(no_method_run, tmp_path, case_id):
  build, message = CONFIG_CASES[case_id]
  workdir = tmp_path / "wd"
  with pytest.raises(ValueError, match=message):
    main_lib.run(build(), str(workdir))
  assert not workdir.exists()


# ----------------------------------------------------------------------------- workdirs


def _unwritable(tmp_path: pathlib.Path) -> pathlib.Path:
  """A directory this process cannot write into (root ignores permission bits: sysfs)."""
  if os.geteuid() == 0:
    return pathlib.Path("/sys/kernel/moe_adapt_workdir")
  path = tmp_path / "read_only"
  path.mkdir()
  path.chmod(0o500)
  return path / "wd"


def _file(tmp_path: pathlib.Path) -> pathlib.Path:
  path = tmp_path / "a_file"
  path.write_text("not a directory")
  return path


def _other_config(tmp_path: pathlib.Path) -> pathlib.Path:
  path = tmp_path / "wd"
  workdir_lib.prepare_workdir(path, config(*MD, seed=1).to_dict())
  return path


def _outputs_without_config(tmp_path: pathlib.Path) -> pathlib.Path:
  path = tmp_path / "wd"
  (path / "checkpoints").mkdir(parents=True)
  return path


WORKDIR_CASES = {
  "workdir_unwritable": (
    _unwritable,
    r"workdir='[^']*(moe_adapt_workdir|read_only/wd)' (is not writable|cannot be created)",
  ),
  "workdir_is_a_file": (_file, r"workdir='.*a_file' cannot be created: .* is not a directory"),
  "workdir_holds_another_config": (
    _other_config,
    r"workdir='.*' holds a run with a different config \(1 differing keys\):\n"
    r"  seed: stored=1 new=0\nPass --overwrite",
  ),
  "workdir_holds_outputs_without_config": (
    _outputs_without_config,
    r"workdir='.*' holds run outputs \(checkpoints\) but no config\.json",
  ),
}


@pytest.mark.parametrize("case_id", list(WORKDIR_CASES))
def test_bad_workdir_is_refused_and_left_as_it_was(no_method_run, tmp_path, case_id):
  make, message = WORKDIR_CASES[case_id]
  workdir = make(tmp_path)
  before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
  with pytest.raises(workdir_lib.WorkdirError, match=message):
    main_lib.run(config(*MD), str(workdir))
  assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


# ----------------------------------------------------------------------------- data, core


def _probs(b: int, c: int) -> jax.Array:
  return jnp.full((b, c), 1.0 / c)


EMPTY_DIR = "/nonexistent/moe_adapt_empty"

CALL_CASES = {
  "data_unknown_benchmark": (
    lambda: data.get_benchmark("nope"),
    r"benchmark='nope' is unknown; accepted: .*digits_rot, .*fmnist_rot",
  ),
  "data_unknown_benchmark_option": (
    lambda: data.get_benchmark("digits_rot", colour=1),
    r"benchmark 'digits_rot' got unknown option\(s\) \['colour'\]; accepted: image_size",
  ),
  "data_text_archive_missing": (
    lambda: data.get_benchmark("vader_sentiment", data_dir=EMPTY_DIR).load(seed=0),
    r"not found: run `moe-adapt-data fetch \w+ --data_dir /nonexistent/moe_adapt_empty` first",
  ),
  "core_shapes_differ": (
    lambda: core.losses.kl_divergence(jnp.zeros((2, 3)), jnp.zeros((2, 4))),
    r"target_logits has shape \(2, 3\) but logits has shape \(2, 4\); accepted: equal shapes",
  ),
  "core_temperature_not_positive": (
    lambda: core.losses.kl_divergence(jnp.zeros((2, 3)), jnp.zeros((2, 3)), temperature=0.0),
    r"temperature=0\.0 is invalid; accepted: a number > 0",
  ),
  "core_label_beyond_class_count": (
    lambda: core.losses.cross_entropy(jnp.zeros((2, 3)), jnp.array([0, 5])),
    r"labels range over \[0, 5\]; accepted: integers in \[0, 3\)",
  ),
  "core_category_mapping_empty_target_class": (
    lambda: core.category_mapping.direct_relationship(_probs(4, 3), jnp.array([0, 0, 1, 1]), 3),
    r"target class\(es\) \[2\] have no examples in target_labels; accepted: at least one",
  ),
  "core_relationship_class_counts": (
    lambda: core.category_mapping.co_tuning_loss(
      jnp.zeros((2, 3)), jnp.zeros((2, 5)), jnp.array([0, 1]), jnp.zeros((3, 4)), trade_off=1.0
    ),
    r"relationship has shape \(3, 4\); accepted: \[C_t, C_s\] = \[3, 5\] from the logits",
  ),
  "core_merge_member_counts_differ": (
    lambda: core.merging.weighted_average({"a": jnp.zeros((2, 3)), "b": jnp.zeros((3, 3))}),
    r"stacked leaves have leading axes \[2, 3\]; accepted: one common size K >= 1",
  ),
  "core_merge_weights_shape": (
    lambda: core.merging.weighted_average({"a": jnp.zeros((2, 3))}, jnp.ones(3)),
    r"weights has shape \(3,\); accepted: \(2,\), one weight per member",
  ),
  "core_merge_adapter_structures_differ": (
    lambda: adapter_soup.stack_trees([{"down": jnp.zeros(2)}, {"up": jnp.zeros(2)}]),
    r"trees\[1\] has another structure than trees\[0\] \(extra leaves: \['up'\]; "
    r"missing leaves: \['down'\]\); accepted: trees of one structure",
  ),
  "core_merge_adapter_shapes_differ": (
    lambda: adapter_soup.stack_trees([{"down": jnp.zeros(2)}, {"down": jnp.zeros(3)}]),
    r"trees\[1\]\['down'\] has shape \(3,\); accepted: \(2,\), the shape in trees\[0\]",
  ),
  "core_prune_density_out_of_range": (
    lambda: core.merging.magnitude_prune({"a": jnp.zeros(3)}, 1.5),
    r"density=1\.5 is invalid; accepted: .*\[0, 1\]",
  ),
  "core_top_k_above_experts": (
    lambda: core.routing.top_k_route(jnp.zeros((2, 3)), 4),
    r"k=4 is invalid for gate_logits of shape \(2, 3\); accepted: an integer in \[1, 3\]",
  ),
  "core_teacher_count_mismatch": (
    lambda: core.routing.integrate_teachers(
      [_probs(2, 3), _probs(2, 3)], jnp.zeros((2, 3)), mode="soft", temperature=1.0
    ),
    r"teacher_probs has 2 teachers but confidences has shape \(2, 3\); accepted: confidences "
    r"of shape \[B, K\] with K = len\(teacher_probs\)",
  ),
  "core_unknown_integration_mode": (
    lambda: core.routing.integrate_teachers(
      [_probs(2, 3), _probs(2, 3)], jnp.zeros((2, 2)), mode="mean", temperature=1.0
    ),
    r"mode='mean' is unknown; accepted: hard, soft",
  ),
  "core_label_index_out_of_range": (
    lambda: core.routing.integrate_teachers(
      [_probs(2, 3), _probs(2, 3)],
      jnp.zeros((2, 2)),
      mode="hard",
      label_index=[[0, 1, 2], [2, 3, 4]],
      num_labels=4,
    ),
    r"label_index\[1\] has values in \[2, 4\]; accepted: columns in \[0, 4\) \(num_labels=4\)",
  ),
  "core_inner_steps_zero": (
    lambda: core.meta.inner_adapt(
      lambda p, b: jnp.sum(p["w"] ** 2), {"w": jnp.ones(2)}, None, lr=0.1, steps=0
    ),
    r"steps=0 is invalid; accepted: a Python int >= 1",
  ),
  "core_calibration_labels_shape": (
    lambda: core.calibration.fit_temperature(jnp.zeros((2, 3)), np.array([0, 1, 2])),
    r"labels has shape \(3,\) but logits has shape \(2, 3\); accepted: labels of shape \[2\]",
  ),
  "core_calibration_labels_range": (
    lambda: core.calibration.fit_temperature(jnp.zeros((2, 3)), np.array([0, 7])),
    r"labels range over \[0, 7\]; accepted: integers in \[0, 3\)",
  ),
}


@pytest.mark.parametrize("case_id", list(CALL_CASES))
def test_bad_call_raises_one_value_error_naming_the_argument(case_id):
  call, message = CALL_CASES[case_id]
  with pytest.raises(ValueError, match=message):
    call()
