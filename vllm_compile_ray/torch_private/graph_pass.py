"""Inductor's base class of a custom post-grad pass (`config.post_grad_custom_post_pass`):
a subclass implements `__call__(graph)` and `uuid()`, which Inductor puts in its cache key."""

from __future__ import annotations

from torch._inductor.custom_graph_pass import CustomGraphPass

__all__ = ["CustomGraphPass"]
