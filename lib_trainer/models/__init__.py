"""What the core needs from a model (ModelParts) and adapters that build it from host objects."""
