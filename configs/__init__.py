"""The config files, one per method (`--config=configs/<method>.py:<preset>`), as a package so
that they share `_shared` and one config can build on another (`recipes/adapter_experts.py`
on `meta_dmoe.py`) by import."""
