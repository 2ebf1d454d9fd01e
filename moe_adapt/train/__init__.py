"""moe_adapt.train."""
