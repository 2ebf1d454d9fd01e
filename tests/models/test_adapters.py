"""Tests of adapters: insertion in the encoder and the ViT, exact identities, param trees."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from moe_adapt.models import adapters, bert, text_classifier, vit

D, R, RANK, LAYERS, CLASSES = 16, 4, 2, 2, 3
TINY = bert.BertConfig(
  vocab_size=50,
  hidden_size=D,
  num_hidden_layers=LAYERS,
  num_attention_heads=4,
  intermediate_size=32,
  max_position_embeddings=16,
)
TOKENS = jnp.asarray(np.random.default_rng(0).integers(1, 50, (2, 6)), jnp.int32)
MASK = jnp.asarray([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]], jnp.int32)
IMAGES = jnp.asarray(np.random.default_rng(1).uniform(size=(2, 8, 8, 1)), jnp.float32)
KINDS = ("none", "houlsby", "pfeiffer", "lora")
ARCHS = ("text", "vit")
HEAD_PARAMS = D * CLASSES + CLASSES


def adapter_config(kind, **kwargs):
  return adapters.AdapterConfig(kind, bottleneck=R, lora_rank=RANK, lora_alpha=4.0, **kwargs)


def make_model(arch, kind, **kwargs):
  config = adapter_config(kind, **kwargs)
  if arch == "text":
    return text_classifier.TextClassifier(TINY, CLASSES, adapter=config), (TOKENS, MASK)
  model = vit.vit_classifier(
    CLASSES, patch_size=4, hidden_size=D, depth=LAYERS, num_heads=4, mlp_dim=32, adapter=config
  )
  return model, (IMAGES,)


@functools.cache
def shapes(arch, kind):
  """The parameter tree's shapes, by tracing only (no compilation)."""
  model, inputs = make_model(arch, kind)
  return jax.eval_shape(model.init, jax.random.key(0), *inputs)["params"]


@functools.cache
def build(arch, kind):
  """(model, params, apply) for one architecture and adapter kind (cached).

  Compiling is the slow part of these tests, so only a few (arch, kind) pairs are built
  and the numerical tests edit their parameters instead of building more variants.
  """
  model, inputs = make_model(arch, kind)
  # Eager, not jitted: for models this small, compiling each variant costs far more than
  # running it op by op (whose per-primitive executables are shared across variants).
  params = model.init(jax.random.key(0), *inputs)["params"]
  return model, params, lambda p: model.apply({"params": p}, *inputs)


def with_adapters(params, fn):
  """`params` with every adapter leaf replaced by fn(path, leaf) (a fresh tree)."""
  backbone, adapter_tree = adapters.split_params(params)
  adapter_tree = jax.tree_util.tree_map_with_path(fn, adapter_tree)
  return adapters.merge_params(jax.tree.map(lambda x: x, backbone), adapter_tree)


def blocks(arch, params):
  if arch == "text":
    return [params["encoder"][f"layer_{i}"] for i in range(LAYERS)]
  return [params["backbone"][f"block_{i}"] for i in range(LAYERS)]


def paths(tree):
  return {
    jax.tree_util.keystr(p, simple=True, separator="/") for p, _ in jax.tree.leaves_with_path(tree)
  }


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", KINDS)
def test_adapters_insert_and_run(arch, kind):
  model, inputs = make_model(arch, kind)
  params = shapes(arch, kind)
  logits = jax.eval_shape(lambda p: model.apply({"params": p}, *inputs), params)
  assert logits.shape == (2, CLASSES)
  for block in blocks(arch, params):
    assert ("adapter_attention" in block) == (kind == "houlsby")
    assert ("adapter_mlp" in block) == (kind in ("houlsby", "pfeiffer"))
    for proj in ("query", "key", "value", "out"):
      has_lora = "lora_a" in block["attention"][proj]
      assert has_lora == (kind == "lora" and proj in ("query", "value"))
    if kind in ("houlsby", "pfeiffer"):
      mlp = block["adapter_mlp"]
      assert mlp["down"]["kernel"].shape == (D, R) and mlp["up"]["kernel"].shape == (R, D)


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_at_init_is_exactly_the_backbone(arch):
  _, lora_params, lora_apply = build(arch, "lora")
  _, _, plain_apply = build(arch, "none")
  backbone, lora_tree = adapters.split_params(lora_params)
  assert lora_tree  # there is something to train
  np.testing.assert_array_equal(lora_apply(lora_params), plain_apply(backbone))


@pytest.mark.parametrize("arch", ARCHS)
def test_houlsby_runs_near_identity_and_zeroed_is_the_backbone(arch):
  _, params, apply = build(arch, "houlsby")
  _, _, plain_apply = build(arch, "none")
  backbone, _ = adapters.split_params(params)
  out, plain = apply(params), plain_apply(backbone)
  assert np.isfinite(out).all() and not np.array_equal(out, plain)
  np.testing.assert_allclose(out, plain, atol=0.05)  # near-identity init (std 1e-2)
  zeroed = with_adapters(params, lambda _, x: jnp.zeros_like(x))
  np.testing.assert_allclose(apply(zeroed), plain, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_houlsby_adapters_sit_on_the_sublayer_outputs(arch):
  """An adapter whose only nonzero parameter is its up bias c adds c to the sublayer output.

  That equals the plain model with c added to the attention-output (resp. FFN-output) bias,
  which holds only if the adapter sits after that projection and before the residual add.
  """
  _, params, apply = build(arch, "houlsby")
  _, _, plain_apply = build(arch, "none")
  rng = np.random.default_rng(2)
  c_attention, c_mlp = (jnp.asarray(rng.normal(size=D), jnp.float32) for _ in range(2))
  params = with_adapters(params, lambda _, x: jnp.zeros_like(x))
  backbone, _ = adapters.split_params(params)
  first, last = blocks(arch, params)[0], blocks(arch, params)[-1]
  first["adapter_attention"]["up"]["bias"] = c_attention
  last["adapter_mlp"]["up"]["bias"] = c_mlp
  first_b, last_b = blocks(arch, backbone)[0], blocks(arch, backbone)[-1]
  first_b["attention"]["out"]["bias"] = first_b["attention"]["out"]["bias"] + c_attention
  last_b["mlp_out"]["bias"] = last_b["mlp_out"]["bias"] + c_mlp
  np.testing.assert_allclose(apply(params), plain_apply(backbone), atol=1e-5)
  assert not np.allclose(apply(params), plain_apply(adapters.split_params(params)[0]))


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_update_equals_merged_kernel(arch):
  _, params, apply = build(arch, "lora")
  _, _, plain_apply = build(arch, "none")
  rng = np.random.default_rng(3)
  params = jax.tree_util.tree_map_with_path(
    lambda p, x: jnp.asarray(rng.normal(size=x.shape), x.dtype) if "lora_b" in str(p) else x,
    params,
  )
  merged = adapters.merge_lora(params, adapter_config("lora"))
  assert not any("lora" in p for p in paths(merged))
  # The folded kernel is W + (alpha / r)·A·B (alpha 4, r 2).
  q = blocks(arch, params)[0]["attention"]["query"]
  np.testing.assert_allclose(
    blocks(arch, merged)[0]["attention"]["query"]["kernel"],
    q["kernel"] + 2.0 * q["lora_a"] @ q["lora_b"],
    rtol=1e-6,
  )
  np.testing.assert_allclose(apply(params), plain_apply(merged), atol=1e-4)
  assert not np.allclose(apply(params), plain_apply(adapters.split_params(params)[0]))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", ["houlsby", "lora"])
def test_split_merge_round_trip(arch, kind):
  params = shapes(arch, kind)
  backbone, adapter_tree = adapters.split_params(params)
  assert paths(backbone) | paths(adapter_tree) == paths(params)
  assert not paths(backbone) & paths(adapter_tree)
  assert all(
    any(part.startswith(("adapter", "lora")) for part in p.split("/")) for p in paths(adapter_tree)
  )
  merged = adapters.merge_params(backbone, adapter_tree)
  assert jax.tree.structure(merged) == jax.tree.structure(params)
  assert jax.tree.all(jax.tree.map(lambda a, b: a is b, merged, params))
  with_head = adapters.split_params(params, include_head=True)
  assert "head" in with_head[1] and "head" not in with_head[0]
  with pytest.raises(ValueError, match="is in both backbone and adapters"):
    adapters.merge_params(params, adapter_tree)


def test_adapter_trees_of_two_runs_stack():
  """Same config → same adapter structure: trees stack along a new expert axis."""
  model, _, _ = build("text", "lora")
  a, b = (
    adapters.split_params(jax.eval_shape(model.init, jax.random.key(s), TOKENS, MASK)["params"])[1]
    for s in (1, 2)
  )
  assert jax.tree.structure(a) == jax.tree.structure(b)
  tree = adapters.split_params(build("text", "lora")[1])[1]
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), tree, jax.tree.map(lambda x: x + 1, tree))
  assert {x.shape[0] for x in jax.tree.leaves(stacked)} == {2}


# Adapter parameters by hand: bottleneck = d·r + r + r·d + d; LoRA = d·r + r·d per target.
BOTTLENECK = D * R + R + R * D + D
EXPECTED_ADAPTER_PARAMS = {
  "houlsby": LAYERS * 2 * BOTTLENECK,
  "pfeiffer": LAYERS * BOTTLENECK,
  "lora": LAYERS * 2 * (D * RANK + RANK * D),
}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", ["houlsby", "pfeiffer", "lora"])
def test_trainable_mask_selects_adapters_and_head(arch, kind):
  params, plain = shapes(arch, kind), shapes(arch, "none")
  mask = adapters.trainable_mask(params, train="adapters")
  assert jax.tree.structure(mask) == jax.tree.structure(params)
  selected = {p for p, on in jax.tree.leaves_with_path(mask) if on}
  expected = {
    p
    for p, _ in jax.tree.leaves_with_path(params)
    if p[0].key == "head" or any(str(k.key).startswith(("adapter", "lora")) for k in p)
  }
  assert selected == expected
  assert adapters.count_params(params, mask) == EXPECTED_ADAPTER_PARAMS[kind] + HEAD_PARAMS
  assert (
    adapters.count_params(params) == adapters.count_params(plain) + EXPECTED_ADAPTER_PARAMS[kind]
  )
  head_mask = adapters.trainable_mask(params, train="head")
  assert adapters.count_params(params, head_mask) == HEAD_PARAMS
  all_mask = adapters.trainable_mask(params, train="all")
  assert adapters.count_params(params, all_mask) == adapters.count_params(params)


def test_param_counts_for_reports():
  _, params, _ = build("text", "lora")
  plain = adapters.count_params(shapes("text", "none"))
  counts = adapters.param_counts(params, train="adapters", config=adapter_config("lora"))
  lora = EXPECTED_ADAPTER_PARAMS["lora"]
  # LoRA folds into the kernels: a deployed model is as large as the plain one.
  assert counts == {"total": plain + lora, "trainable": lora + HEAD_PARAMS, "inference": plain}
  houlsby = shapes("text", "houlsby")
  counts = adapters.param_counts(houlsby, train="head", config=adapter_config("houlsby"))
  total = plain + EXPECTED_ADAPTER_PARAMS["houlsby"]
  assert counts == {"total": total, "trainable": HEAD_PARAMS, "inference": total}


def test_trainable_mask_errors():
  plain = shapes("text", "none")
  with pytest.raises(ValueError, match="train='adapters' but params hold no adapter"):
    adapters.trainable_mask(plain, train="adapters")
  with pytest.raises(ValueError, match="train='encoder' is unknown; accepted: adapters, head, all"):
    adapters.trainable_mask(plain, train="encoder")
  with pytest.raises(ValueError, match="needs a top-level 'head'"):
    adapters.trainable_mask(plain["encoder"], train="head")
  with pytest.raises(ValueError, match="nested mapping"):
    adapters.split_params([1, 2])


def test_trainable_optimizer_changes_only_adapters_and_head():
  model, params, _ = build("text", "lora")
  tx = adapters.trainable_optimizer(optax.adam(1e-2), params, train="adapters")
  labels = jnp.asarray([0, 2])

  @jax.jit
  def step(params, opt_state):
    def loss(p):
      logits = model.apply({"params": p}, TOKENS, MASK)
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    updates, opt_state = tx.update(jax.grad(loss)(params), opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  new, _ = step(params, tx.init(params))
  mask = adapters.trainable_mask(params, train="adapters")
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), params, new)
  frozen_changed = [c for c, on in zip(jax.tree.leaves(changed), jax.tree.leaves(mask)) if not on]
  assert not any(frozen_changed)
  assert changed["head"]["kernel"]
  assert changed["encoder"]["layer_0"]["attention"]["query"]["lora_b"]


def test_adapter_config_validation():
  with pytest.raises(ValueError, match="kind='prefix' is unknown; accepted: none, houlsby"):
    adapters.AdapterConfig("prefix")
  with pytest.raises(ValueError, match=r"lora_targets=.*must be a non-empty subset of: query"):
    adapters.AdapterConfig("lora", lora_targets=("q",))
  with pytest.raises(ValueError, match="bottleneck=0 must be a positive int"):
    adapters.AdapterConfig("houlsby", bottleneck=0)
  with pytest.raises(ValueError, match="activation='elu' is unknown"):
    adapters.AdapterConfig("houlsby", activation="elu")
  assert adapters.AdapterConfig("lora", lora_targets=["key"]).lora_targets == ("key",)


def test_registering_a_new_kind_plugs_into_the_block(monkeypatch):
  """The extension point a mixture adapter uses: a kind chooses modules per placement."""
  monkeypatch.setattr(adapters, "_KINDS", dict(adapters._KINDS))

  def make_adapter(config, dim, *, name, dtype):
    return adapters.BottleneckAdapter(dim, 1, "relu", 0.1, dtype=dtype, name=name)

  def make_projection(config, features, *, name, **kwargs):
    return adapters.LoRADense(features, 1, 1.0, name=name, **kwargs)

  adapters.register_adapter_kind(
    "custom",
    adapters.AdapterKind(("attention",), make_adapter, make_projection),
  )
  with pytest.raises(ValueError, match="already registered"):
    adapters.register_adapter_kind("custom", adapters.AdapterKind())
  config = adapters.AdapterConfig("custom", lora_targets=("mlp_in",))
  block = bert.TransformerBlock(4, 32, adapter=config)
  params = jax.eval_shape(block.init, jax.random.key(0), jnp.zeros((1, 3, D)))["params"]
  assert set(params) >= {"adapter_attention", "mlp_in"} and "adapter_mlp" not in params
  assert params["adapter_attention"]["down"]["kernel"].shape == (D, 1)
  assert params["mlp_in"]["lora_a"].shape == (D, 1)
