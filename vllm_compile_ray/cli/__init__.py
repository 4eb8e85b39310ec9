"""`vcr`: the command line over the library."""

from .commands import main

__all__ = ["main"]
