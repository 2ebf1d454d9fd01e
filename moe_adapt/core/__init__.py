"""Pure, jit-able functions on arrays and pytrees; depends on jax/optax/chex only."""

from moe_adapt.core import calibration, category_mapping, losses, merging, meta, routing

__all__ = ["calibration", "category_mapping", "losses", "merging", "meta", "routing"]
