"""Built-in training recipes (YAML files read with importlib.resources)."""
