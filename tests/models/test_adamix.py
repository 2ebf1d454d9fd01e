"""Tests of AdaMix mixtures: parameter trees, routing, inference modes, merging, gradients."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from moe_adapt.models import adamix, adapters, bert, text_classifier, vit

D, R, RANK, ALPHA, M, LAYERS, CLASSES = 16, 4, 2, 4.0, 4, 2, 3
SCALE = ALPHA / RANK
SHARES = ("none", "up", "down")
# Dropout off, so that only routing makes training forwards random.
TINY = bert.BertConfig(
  vocab_size=50,
  hidden_size=D,
  num_hidden_layers=LAYERS,
  num_attention_heads=4,
  intermediate_size=32,
  max_position_embeddings=16,
  hidden_dropout_prob=0.0,
  attention_probs_dropout_prob=0.0,
)
TOKENS = jnp.asarray(np.random.default_rng(0).integers(1, 50, (2, 6)), jnp.int32)
MASK = jnp.asarray([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]], jnp.int32)
X = jnp.asarray(np.random.default_rng(1).normal(size=(2, 5, D)), jnp.float32)


def config(kind, **kwargs):
  kwargs = {"num_experts": M, **kwargs}
  return adapters.AdapterConfig(
    kind, bottleneck=R, lora_rank=RANK, lora_alpha=ALPHA, init_scale=0.3, **kwargs
  )


def text_model(kind, **kwargs):
  return text_classifier.TextClassifier(TINY, CLASSES, adapter=config(kind, **kwargs))


@functools.cache
def text_params(kind, share="up"):
  """Initialised params of the tiny text classifier (cached; eager, as compiling costs more)."""
  return text_model(kind, share=share).init(jax.random.key(0), TOKENS, MASK)["params"]


def text_shapes(kind, share="up"):
  """The tiny text classifier's parameter shapes, by tracing only."""
  params = jax.eval_shape(text_model(kind, share=share).init, jax.random.key(0), TOKENS, MASK)
  return jax.tree.map(lambda a: a.shape, params["params"])


def randomize(params, seed, which=("adapter", "lora")):
  """`params` with every leaf under a key starting with one of `which` drawn N(0, 0.5²)."""
  rng = np.random.default_rng(seed)

  def draw(path, x):
    if any(str(getattr(k, "key", "")).startswith(which) for k in path):
      return jnp.asarray(rng.normal(scale=0.5, size=x.shape), x.dtype)
    return x

  return jax.tree_util.tree_map_with_path(draw, params)


def gelu(x):
  return 0.5 * x * (1 + erf(x / np.sqrt(2)))


def bottleneck_np(x, wd, bd, wu, bu):
  x = np.asarray(x, np.float64)
  return x + gelu(x @ wd + bd) @ wu + bu


def np_tree(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def adapter_module(share, **kwargs):
  return adamix.MixtureAdapter(D, R, M, share, init_scale=0.3, **kwargs)


def lora_module(share, **kwargs):
  return adamix.MixtureLoRADense(D, RANK, ALPHA, M, share, **kwargs)


@functools.cache
def module_params(kind, share):
  """Random params (all leaves) of a module-level mixture, as float32 arrays."""
  module = adapter_module(share) if kind == "adamix" else lora_module(share)
  params = module.init(jax.random.key(0), X)["params"]
  rng = np.random.default_rng(7)
  return jax.tree.map(lambda a: jnp.asarray(rng.normal(scale=0.5, size=a.shape), a.dtype), params)


def routed(share, side):
  """Whether the 'down'/'up' side (A/B for LoRA) carries the expert axis."""
  return share != side


# ---------------------------------------------------------------------------------------
# Parameter trees.
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("share", SHARES)
def test_adamix_parameter_tree_and_split(share):
  params = text_shapes("adamix", share)
  backbone, adapter_tree = adapters.split_params(params)
  for i in range(LAYERS):
    block = params["encoder"][f"layer_{i}"]
    assert "adapter_attention" not in block  # AdaMix: one mixture per layer, after the FFN
    mix = block["adapter_mlp"]
    lead = {side: (M,) if routed(share, side) else () for side in ("down", "up")}
    assert mix == {
      "down": {"kernel": (*lead["down"], D, R), "bias": (*lead["down"], R)},
      "up": {"kernel": (*lead["up"], R, D), "bias": (*lead["up"], D)},
    }
    assert "adapter_mlp" in adapter_tree["encoder"][f"layer_{i}"]
    assert "adapter_mlp" not in backbone["encoder"][f"layer_{i}"]
  assert backbone == text_shapes("none")  # exactly the plain model's tree


@pytest.mark.parametrize("share", SHARES)
def test_adamix_lora_parameter_tree_and_split(share):
  params = text_shapes("adamix_lora", share)
  backbone, adapter_tree = adapters.split_params(params)
  a_shape = (M, D, RANK) if routed(share, "down") else (D, RANK)
  b_shape = (M, RANK, D) if routed(share, "up") else (RANK, D)
  for i in range(LAYERS):
    attention = params["encoder"][f"layer_{i}"]["attention"]
    for proj in ("query", "key", "value", "out"):
      shapes = attention[proj]
      if proj in ("query", "value"):
        assert shapes == {"kernel": (D, D), "bias": (D,), "lora_a": a_shape, "lora_b": b_shape}
        assert set(adapter_tree["encoder"][f"layer_{i}"]["attention"][proj]) == {
          "lora_a",
          "lora_b",
        }
      else:
        assert shapes == {"kernel": (D, D), "bias": (D,)}
  assert backbone == text_shapes("none")


def test_vit_gets_one_mixture_per_block():
  model = vit.vit_classifier(
    CLASSES,
    patch_size=4,
    hidden_size=D,
    depth=LAYERS,
    num_heads=4,
    mlp_dim=32,
    adapter=config("adamix"),
  )
  params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((2, 8, 8, 1)))["params"]
  for i in range(LAYERS):
    block = params["backbone"][f"block_{i}"]
    assert block["adapter_mlp"]["down"]["kernel"].shape == (M, D, R)
    assert "adapter_attention" not in block


def test_init_experts_differ_for_adapters_and_are_copies_for_lora():
  adapter = adapter_module("none").init(jax.random.key(0), X)["params"]
  down = np.asarray(adapter["down"]["kernel"])
  assert all(not np.allclose(down[0], down[i]) for i in range(1, M))
  assert 0.2 < down.std() < 0.4 and not np.any(adapter["down"]["bias"])  # normal(0.3)
  lora = lora_module("none").init(jax.random.key(0), X)["params"]
  a = np.asarray(lora["lora_a"])
  assert all(np.array_equal(a[0], a[i]) for i in range(M))
  # Kaiming-uniform(a=√5) on fan_in = D: U(-1/√D, 1/√D), not fan_in·M.
  assert np.abs(a).max() <= 1 / np.sqrt(D) and np.abs(a).max() > 0.8 / np.sqrt(D)
  assert not np.any(lora["lora_b"])


# ---------------------------------------------------------------------------------------
# Routing.
# ---------------------------------------------------------------------------------------


@functools.cache
def routed_forward(kind):
  """Jitted training forward of the tiny text model: (params, key) → (logits, state)."""
  model = text_model(kind)

  @jax.jit
  def forward(params, key):
    return model.apply(
      {"params": params}, TOKENS, MASK, train=True, rngs={"routing": key}, mutable=["intermediates"]
    )

  return forward


def routed_apply(kind, params, key):
  """Training forward with routing key `key`: (logits, {path: chosen expert})."""
  logits, state = routed_forward(kind)(params, key)
  choices = {
    jax.tree_util.keystr(p, simple=True, separator="/"): int(v)
    for p, v in jax.tree.leaves_with_path(state["intermediates"])
  }
  return logits, choices


def test_training_forward_depends_on_the_routing_key_only():
  params = text_params("adamix")
  out_a, choice_a = routed_apply("adamix", params, jax.random.key(1))
  out_a2, choice_a2 = routed_apply("adamix", params, jax.random.key(1))
  out_b, choice_b = routed_apply("adamix", params, jax.random.key(2))
  assert len(choice_a) == LAYERS  # share='up': only the down projections are routed
  np.testing.assert_array_equal(out_a, out_a2)
  assert choice_a == choice_a2
  assert choice_a != choice_b and not np.allclose(out_a, out_b)


@functools.cache
def many_choices(num_keys):
  """Expert choices of the tiny text model (share='none') for `num_keys` routing keys."""
  model = text_model("adamix", share="none")
  params = text_params("adamix", "none")

  @jax.jit
  @jax.vmap
  def choose(key):
    _, state = model.apply(
      {"params": params}, TOKENS, MASK, train=True, rngs={"routing": key}, mutable=["intermediates"]
    )
    return state["intermediates"]["encoder"]

  keys = jax.random.split(jax.random.key(3), num_keys)
  layers = choose(keys)
  return {
    (i, side): np.asarray(layers[f"layer_{i}"]["adapter_mlp"][side]["expert"][0])
    for i in range(LAYERS)
    for side in ("down", "up")
  }


def test_routing_is_uniform_and_independent_per_layer_and_projection():
  choices = many_choices(400)
  for index in choices.values():
    counts = np.bincount(index, minlength=M)
    assert counts.min() > 60 and counts.max() < 140  # uniform: 100 ± ~4.5σ
  # Down and up draw separately: all M² (down_i, up_j) pairs occur, not only i == j.
  pairs = {tuple(p) for p in zip(choices[0, "down"], choices[0, "up"])}
  assert len(pairs) == M * M
  # Layers draw separately.
  assert len({tuple(p) for p in zip(choices[0, "down"], choices[1, "down"])}) == M * M
  for a, b in [((0, "down"), (0, "up")), ((0, "down"), (1, "down"))]:
    assert np.mean(choices[a] == choices[b]) < 0.4  # 1/M if independent


def test_missing_routing_rng_is_a_clear_error():
  model, params = text_model("adamix"), text_params("adamix")
  with pytest.raises(
    ValueError, match=r"layer_0/adapter_mlp/down: AdaMix routing needs a 'routing'"
  ):
    model.apply({"params": params}, TOKENS, MASK, train=True)
  # Eval with the default mixture_inference='merged' needs no rng.
  model.apply({"params": params}, TOKENS, MASK)


def test_random_inference_with_a_fixed_key_is_one_sub_model():
  module = adapter_module("none", mixture_inference="random")
  variables = {"params": module_params("adamix", "none")}
  key = jax.random.key(5)
  ys, picks = [], []
  for batch in (X, X[::-1]):
    y, state = module.apply(variables, batch, rngs={"routing": key}, mutable=["intermediates"])
    ys.append(y)
    picks.append(jax.tree.map(int, state["intermediates"]))
  assert picks[0] == picks[1]  # same key → same expert for every batch
  np.testing.assert_allclose(ys[1], ys[0][::-1], rtol=1e-6, atol=1e-6)

  def experts(seed):
    state = module.apply(
      variables, X, rngs={"routing": jax.random.key(seed)}, mutable=["intermediates"]
    )[1]
    return str(jax.tree.map(int, state))

  others = {experts(seed) for seed in range(8)}
  assert len(others) > 1
  with pytest.raises(ValueError, match="AdaMix routing needs a 'routing'"):
    module.apply(variables, X)


@pytest.mark.parametrize("pairing", ["independent", "paired"])
def test_unshared_lora_routes_a_and_b_by_pairing(pairing):
  # 'paired': expert i is (A_i, B_i), the sub-models the ΔW merge averages; 'independent'
  # (official): separate draws, so some steps train A_i with B_j (i ≠ j).
  module = lora_module("none", mixture_inference="random", pairing=pairing)
  variables = {"params": module_params("adamix_lora", "none")}
  same = []
  for seed in range(8):
    _, state = module.apply(
      variables, X, rngs={"routing": jax.random.key(seed)}, mutable=["intermediates"]
    )
    picks = state["intermediates"]
    same.append(int(picks["expert_a"][0]) == int(picks["expert_b"][0]))
  assert all(same) == (pairing == "paired")


@pytest.mark.parametrize("kind", ["adamix", "adamix_lora"])
def test_random_example_inference_draws_an_expert_per_example(kind):
  # Each example's output is that of the fixed-expert module for its own drawn expert; a
  # batch of 64 copies of one example meets several experts; fresh keys give fresh draws.
  share = "none"
  make = adapter_module if kind == "adamix" else lora_module
  params = module_params(kind, share)
  x = jnp.broadcast_to(X[:1], (64, *X.shape[1:]))
  module = make(share, mixture_inference="random_example")
  y, state = module.apply(
    {"params": params}, x, rngs={"routing": jax.random.key(3)}, mutable=["intermediates"]
  )
  picks = jax.tree.map(np.asarray, state["intermediates"])
  leaves = jax.tree.leaves(picks)
  assert all(p.shape == (64,) for p in leaves)
  assert len(set(leaves[0].tolist())) > 1
  p = np_tree(params)
  for b in range(8):
    if kind == "adamix":
      down, up = picks["down"]["expert"][0][b], picks["up"]["expert"][0][b]
      expected = bottleneck_np(
        x[b],
        p["down"]["kernel"][down],
        p["down"]["bias"][down],
        p["up"]["kernel"][up],
        p["up"]["bias"][up],
      )
    else:
      i, j = picks["expert_a"][0][b], picks["expert_b"][0][b]
      expected = lora_np(x[b], p, p["lora_a"][i], p["lora_b"][j])
    np.testing.assert_allclose(y[b], expected, rtol=1e-5, atol=1e-5)
  again = module.apply(
    {"params": params}, x, rngs={"routing": jax.random.key(4)}, mutable=["intermediates"]
  )[1]
  assert not np.array_equal(jax.tree.leaves(again["intermediates"])[0], leaves[0])


# ---------------------------------------------------------------------------------------
# Inference modes against NumPy.
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("share", ["none", "up"])
def test_fixed_inference_is_expert_k_as_a_bottleneck_adapter(share):
  k = 2
  params = module_params("adamix", share)
  y = adapter_module(share, mixture_inference="fixed", fixed_expert=k).apply({"params": params}, X)
  p = np_tree(params)
  pick = lambda side, leaf: p[side][leaf][k] if routed(share, side) else p[side][leaf]
  single = {
    side: {leaf: pick(side, leaf) for leaf in ("kernel", "bias")} for side in ("down", "up")
  }
  expected = bottleneck_np(
    X,
    single["down"]["kernel"],
    single["down"]["bias"],
    single["up"]["kernel"],
    single["up"]["bias"],
  )
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
  plain = adapters.BottleneckAdapter(D, R, "gelu")
  np.testing.assert_allclose(
    y, plain.apply({"params": jax.tree.map(jnp.float32, single)}, X), rtol=1e-6, atol=1e-6
  )


@pytest.mark.parametrize("share", SHARES)
def test_merged_inference_is_the_weight_average(share):
  params = module_params("adamix", share)
  y = adapter_module(share).apply({"params": params}, X)
  p = np_tree(params)
  avg = {
    side: {
      leaf: p[side][leaf].mean(0) if routed(share, side) else p[side][leaf] for leaf in p[side]
    }
    for side in ("down", "up")
  }
  expected = bottleneck_np(
    X, avg["down"]["kernel"], avg["down"]["bias"], avg["up"]["kernel"], avg["up"]["bias"]
  )
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
  # With routed down-projections a merged mixture is not the average of the experts'
  # outputs (GELU sits in between); with a shared down only the linear up varies, and it is.
  experts = [
    adapter_module(share, mixture_inference="fixed", fixed_expert=i).apply({"params": params}, X)
    for i in range(M)
  ]
  same = np.allclose(y, np.mean(experts, axis=0), atol=1e-4)
  assert same == (share == "down")


def lora_np(x, p, a, b):
  x = np.asarray(x, np.float64)
  return x @ p["kernel"] + p["bias"] + SCALE * (x @ a) @ b


@pytest.mark.parametrize(
  "share, pairing", [(s, "independent") for s in SHARES] + [("none", "paired")]
)
def test_lora_fixed_and_merged_inference(share, pairing):
  params = module_params("adamix_lora", share)
  p = np_tree(params)
  a_routed, b_routed = routed(share, "down"), routed(share, "up")
  k = 3
  fixed = lora_module(share, mixture_inference="fixed", fixed_expert=k).apply({"params": params}, X)
  a_k = p["lora_a"][k] if a_routed else p["lora_a"]
  b_k = p["lora_b"][k] if b_routed else p["lora_b"]
  np.testing.assert_allclose(fixed, lora_np(X, p, a_k, b_k), rtol=1e-5, atol=1e-5)
  # As the single-LoRA module built from expert k's slices.
  single = {"kernel": p["kernel"], "bias": p["bias"], "lora_a": a_k, "lora_b": b_k}
  plain = adapters.LoRADense(D, RANK, ALPHA).apply({"params": jax.tree.map(jnp.float32, single)}, X)
  np.testing.assert_allclose(fixed, plain, rtol=1e-5, atol=1e-5)

  merged = lora_module(share, pairing=pairing).apply({"params": params}, X)
  a, b = p["lora_a"], p["lora_b"]
  if a_routed and b_routed and pairing == "paired":
    delta = SCALE * np.mean([a[i] @ b[i] for i in range(M)], axis=0)
  else:
    delta = SCALE * (a.mean(0) if a_routed else a) @ (b.mean(0) if b_routed else b)
  expected = np.asarray(X, np.float64) @ (p["kernel"] + delta) + p["bias"]
  np.testing.assert_allclose(merged, expected, rtol=1e-5, atol=1e-5)


def test_lora_merge_with_shared_b_is_exact_in_delta_w():
  """B shared: scale·mean(A)·B == mean_i(scale·A_i·B), the identity AdaMix-LoRA relies on."""
  p = module_params("adamix_lora", "up")
  a, b = np.asarray(p["lora_a"], np.float64), np.asarray(p["lora_b"], np.float64)
  delta = adamix.mixture_lora_delta(p["lora_a"], p["lora_b"], scale=SCALE)
  np.testing.assert_allclose(delta, SCALE * a.mean(0) @ b, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
    delta, np.mean([SCALE * a[i] @ b for i in range(M)], axis=0), rtol=1e-5, atol=1e-6
  )


def test_lora_unshared_merge_forms():
  # 'independent' (official, the default): mean(B)·mean(A) in torch's [out, in] layout,
  # i.e. mean(A)·mean(B) here = the mean over all M² pairs A_i·B_j; 'paired': mean(A_i·B_i).
  p = module_params("adamix_lora", "none")
  a, b = np.asarray(p["lora_a"], np.float64), np.asarray(p["lora_b"], np.float64)
  official = np.asarray(adamix.mixture_lora_delta(p["lora_a"], p["lora_b"], scale=SCALE))
  cross = SCALE * a.mean(0) @ b.mean(0)
  np.testing.assert_allclose(official, cross, rtol=1e-5, atol=1e-6)
  all_pairs = np.mean([SCALE * a[i] @ b[j] for i in range(M) for j in range(M)], axis=0)
  np.testing.assert_allclose(official, all_pairs, rtol=1e-5, atol=1e-6)
  delta = np.asarray(
    adamix.mixture_lora_delta(p["lora_a"], p["lora_b"], scale=SCALE, pairing="paired")
  )
  mean_delta = np.mean([SCALE * a[i] @ b[i] for i in range(M)], axis=0)
  np.testing.assert_allclose(delta, mean_delta, rtol=1e-5, atol=1e-6)
  assert np.abs(delta - cross).max() > 0.1 * np.abs(mean_delta).max()
  with pytest.raises(ValueError, match="pairing='pairs' is unknown; accepted: independent"):
    adamix.mixture_lora_delta(p["lora_a"], p["lora_b"], scale=SCALE, pairing="pairs")
  a_shared = adamix.mixture_lora_delta(p["lora_a"][0], p["lora_b"], scale=SCALE)
  np.testing.assert_allclose(a_shared, SCALE * a[0] @ b.mean(0), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------
# Whole models: merged forward == the single-adapter model; LoRA at init == the backbone.
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "kind, share, pairing",
  [
    ("adamix", "up", "independent"),
    ("adamix", "none", "independent"),
    ("adamix_lora", "up", "independent"),
    ("adamix_lora", "none", "independent"),
    ("adamix_lora", "none", "paired"),
    ("adamix_lora", "down", "independent"),
  ],
)
def test_merged_model_equals_the_merged_single_model(kind, share, pairing):
  cfg = config(kind, share=share, lora_pairing=pairing)
  params = randomize(text_params(kind, share), seed=11)
  model = text_model(kind, share=share, lora_pairing=pairing)
  merged_out = model.apply({"params": params}, TOKENS, MASK)
  single_params, single_cfg = adamix.merge_mixture_params(params, cfg)
  single_kind = "pfeiffer" if kind == "adamix" else "none"
  assert single_cfg == config(single_kind, share=share, lora_pairing=pairing)
  single_shapes = jax.eval_shape(
    text_classifier.TextClassifier(TINY, CLASSES, adapter=single_cfg).init,
    jax.random.key(0),
    TOKENS,
    MASK,
  )["params"]
  assert jax.tree.map(jnp.shape, single_params) == jax.tree.map(lambda s: s.shape, single_shapes)
  single_out = text_classifier.TextClassifier(TINY, CLASSES, adapter=single_cfg).apply(
    {"params": single_params}, TOKENS, MASK
  )
  np.testing.assert_allclose(merged_out, single_out, rtol=1e-5, atol=1e-5)
  # The mixture matters: the backbone alone gives something else.
  plain = text_model("none").apply({"params": adapters.split_params(params)[0]}, TOKENS, MASK)
  assert not np.allclose(merged_out, plain, atol=1e-3)


def test_adamix_lora_at_init_is_exactly_the_backbone():
  params = text_params("adamix_lora", "up")
  backbone, lora_tree = adapters.split_params(params)
  assert lora_tree
  plain = text_model("none").apply({"params": backbone}, TOKENS, MASK)
  model = text_model("adamix_lora")
  np.testing.assert_array_equal(model.apply({"params": params}, TOKENS, MASK), plain)
  train_out = model.apply(
    {"params": params}, TOKENS, MASK, train=True, rngs={"routing": jax.random.key(4)}
  )
  np.testing.assert_array_equal(train_out, plain)


def test_param_counts_by_hand():
  counts = adamix.mixture_param_counts(text_params("adamix", "up"), config("adamix"))
  one = D * R + R + R * D + D
  assert counts == {
    "trainable_adapter": LAYERS * (M * (D * R + R) + R * D + D),
    "inference_adapter": LAYERS * one,
  }
  shapes = jax.eval_shape(text_model("adamix_lora").init, jax.random.key(0), TOKENS, MASK)["params"]
  counts = adamix.mixture_param_counts(shapes, config("adamix_lora"))
  assert counts == {
    "trainable_adapter": LAYERS * 2 * (M * D * RANK + RANK * D),
    "inference_adapter": 0,
  }


@pytest.mark.parametrize("deterministic", [True, False])
def test_bfloat16_inputs(deterministic):
  rngs = {"routing": jax.random.key(0)}
  for module, kind in ((adapter_module("none"), "adamix"), (lora_module("none"), "adamix_lora")):
    variables = {"params": module_params(kind, "none")}
    y32 = module.apply(variables, X, deterministic=deterministic, rngs=rngs)
    y16 = module.apply(variables, X.astype(jnp.bfloat16), deterministic=deterministic, rngs=rngs)
    assert y16.dtype == jnp.bfloat16
    np.testing.assert_allclose(y16.astype(jnp.float32), y32, rtol=0.05, atol=0.1)


# ---------------------------------------------------------------------------------------
# Gradients.
# ---------------------------------------------------------------------------------------


def test_gradient_reaches_only_the_chosen_adapter_expert_and_the_shared_up():
  model, params = text_model("adamix"), text_params("adamix", "up")
  weights = jnp.asarray(np.random.default_rng(8).normal(size=(2, CLASSES)), jnp.float32)

  def loss(p):
    logits, state = model.apply(
      {"params": p},
      TOKENS,
      MASK,
      train=True,
      rngs={"routing": jax.random.key(9)},
      mutable=["intermediates"],
    )
    return jnp.sum(logits * weights), state["intermediates"]["encoder"]

  grads, chosen = jax.jit(jax.grad(loss, has_aux=True))(params)
  for i in range(LAYERS):
    g = grads["encoder"][f"layer_{i}"]["adapter_mlp"]
    k = int(chosen[f"layer_{i}"]["adapter_mlp"]["down"]["expert"][0])
    for leaf in ("kernel", "bias"):
      norms = np.abs(np.asarray(g["down"][leaf])).reshape(M, -1).sum(1)
      assert norms[k] > 0 and np.all(np.delete(norms, k) == 0), (i, leaf, norms)
      assert np.abs(g["up"][leaf]).sum() > 0  # shared: always trained


def test_gradient_reaches_only_the_chosen_lora_a_and_the_shared_b():
  module = lora_module("up")
  params = module_params("adamix_lora", "up")

  def loss(p):
    y, state = module.apply(
      {"params": p},
      X,
      deterministic=False,
      rngs={"routing": jax.random.key(2)},
      mutable=["intermediates"],
    )
    return jnp.sum(jnp.sin(y)), state["intermediates"]["expert_a"][0]

  grads, k = jax.grad(loss, has_aux=True)(params)
  norms = np.abs(np.asarray(grads["lora_a"])).reshape(M, -1).sum(1)
  assert norms[int(k)] > 0 and np.all(np.delete(norms, int(k)) == 0)
  assert np.abs(grads["lora_b"]).sum() > 0


# ---------------------------------------------------------------------------------------
# Bad input.
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "field, value, match",
  [
    ("num_experts", 0, "num_experts=0 is invalid; accepted: an int >= 1"),
    ("num_experts", 2.0, "num_experts=2.0 is invalid"),
    ("share", "both", "share='both' is unknown; accepted: none, up, down"),
    ("mixture_inference", "mean", "mixture_inference='mean' is unknown; accepted: merged, random"),
    ("fixed_expert", 4, r"fixed_expert=4 is invalid; accepted: an int in \[0, num_experts=4\)"),
    ("fixed_expert", -1, "fixed_expert=-1 is invalid"),
  ],
)
def test_bad_mixture_options(field, value, match):
  with pytest.raises(ValueError, match=match):
    config("adamix", **{field: value})
  with pytest.raises(ValueError, match=match):
    adamix.MixtureAdapter(D, R, **{"num_experts": M, field: value})


def test_bad_position_pairing_and_width():
  with pytest.raises(ValueError, match="position='after' is unknown; accepted: after_dropout"):
    config("adamix", position="after")
  with pytest.raises(ValueError, match="lora_pairing='both' is unknown; accepted: independent"):
    config("adamix_lora", lora_pairing="both")
  too_wide = rf"bottleneck={D + 1} exceeds the hidden size {D}; accepted: an int in \[1, {D}\]"
  with pytest.raises(ValueError, match=too_wide):
    adamix.MixtureAdapter(D, D + 1).init(jax.random.key(0), X)
  with pytest.raises(ValueError, match=too_wide):
    adapters.BottleneckAdapter(D, D + 1).init(jax.random.key(0), X)


def test_merge_mixture_params_errors():
  params = text_params("adamix", "up")
  with pytest.raises(ValueError, match=r"config\.kind='pfeiffer' is invalid; accepted: adamix"):
    adamix.merge_mixture_params(params, config("pfeiffer"))
  with pytest.raises(ValueError, match=r"adapter_mlp/up/kernel has shape \(4, 16\)"):
    adamix.merge_mixture_params(params, config("adamix", share="none"))
  with pytest.raises(ValueError, match=r"adapter_mlp/down/kernel has shape \(4, 16, 4\)"):
    adamix.merge_mixture_params(params, config("adamix", num_experts=3, fixed_expert=0))
  with pytest.raises(ValueError, match="params hold no 'adamix_lora' mixtures"):
    adamix.merge_mixture_params(params, config("adamix_lora"))


@pytest.mark.parametrize("kind", ["pfeiffer", "adamix"])
def test_adapter_position_relative_to_dropout(kind):
  # 'before_dropout' (official AdaMix) = drop(adapter(h)); 'after_dropout' = adapter(drop(h)).
  # They coincide without dropout (eval, or rate 0) and differ with it on the same keys.
  def block(position, rate):
    cfg = config(kind, position=position)
    return bert.TransformerBlock(4, 32, dropout_rate=rate, adapter=cfg)

  params = randomize(block("after_dropout", 0.5).init(jax.random.key(0), X)["params"], seed=2)
  rngs = {"dropout": jax.random.key(1), "routing": jax.random.key(2)}

  def out(position, rate, deterministic):
    return block(position, rate).apply(
      {"params": params}, X, deterministic=deterministic, rngs=rngs
    )

  np.testing.assert_array_equal(out("before_dropout", 0.5, True), out("after_dropout", 0.5, True))
  np.testing.assert_allclose(
    out("before_dropout", 0.0, False), out("after_dropout", 0.0, False), rtol=1e-6, atol=1e-6
  )
  assert not np.allclose(out("before_dropout", 0.5, False), out("after_dropout", 0.5, False))
