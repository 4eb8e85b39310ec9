"""`vcr`: the command line over the library."""

from .main import main

__all__ = ["main"]
