"""Options off by default, each with the measurement that keeps it in its docstring."""
