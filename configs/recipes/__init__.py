"""The cross-method recipes\x27 configs (`--config=configs/recipes/<recipe>.py:<preset>`)."""
