"""Recipes: methods composed from the pieces of `moe_adapt.methods` (issue #11).

Each module exposes the method interface of `moe_adapt.methods` (`validate_config`,
`make_setup`, `run`) and is registered there, so `moe-adapt --config=configs/recipes/...`
runs it.
"""
