"""moe_adapt: adapting models to new domains and tasks by reusing several experts."""

__version__ = "0.1.0"
