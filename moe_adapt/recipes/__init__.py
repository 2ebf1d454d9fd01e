"""Recipes: methods composed from the pieces of `moe_adapt.methods` (issue #11).

Each module exposes the method interface of `moe_adapt.methods` (`validate_config`,
`make_setup`, `run`). Importing this package registers them as methods (by module path, so
nothing heavy is imported), so `moe-adapt --config=configs/recipes/...` runs them: the
methods layer does not know the recipes above it.
"""

from moe_adapt import methods

RECIPES = ("adapter_experts", "cotuned_teachers")
for _name in RECIPES:
  methods.register_method(_name, f"moe_adapt.recipes.{_name}")
