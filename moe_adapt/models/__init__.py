"""moe_adapt.models."""
