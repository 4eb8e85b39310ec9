"""Planning: capture a model with dynamo, split it at attention, canonicalize and key the pieces."""
