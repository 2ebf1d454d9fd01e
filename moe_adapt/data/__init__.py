"""moe_adapt.data."""
