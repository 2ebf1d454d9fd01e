"""moe_adapt.methods."""
