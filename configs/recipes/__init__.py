"""The cross-method recipes' configs (`--config=configs/recipes/<recipe>.py:<preset>`)."""
