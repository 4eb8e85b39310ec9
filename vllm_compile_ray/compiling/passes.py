"""`InductorPass` and `PostGradPassManager`: custom post-grad passes whose source is in the key."""

from __future__ import annotations

import functools
import hashlib
import inspect
import time
import types
from collections.abc import Callable

import torch.fx as fx

from ..torch_private.graph_pass import CustomGraphPass


class InductorPass(CustomGraphPass):
    """A post-grad pass over an fx graph. Its uuid hashes its source, so editing a pass changes
    every key it touches. Subclasses implement `__call__(graph)`."""

    def __call__(self, graph: fx.Graph) -> None:
        raise NotImplementedError

    def uuid(self) -> str:
        return self.hash_source(self)

    @staticmethod
    @functools.cache
    def hash_source(*srcs: object) -> str:
        """sha256 of the sources of the given passes, classes or functions.

        Cached (vLLM measured uncached hashing as most of its lookup time). A pass instance hashes
        as its class, so instances are cheap and equal passes share an entry.
        """
        hasher = hashlib.sha256()
        for src in srcs:
            if isinstance(src, str):
                text = src
            elif isinstance(src, (types.FunctionType, type)):
                text = inspect.getsource(src)
            else:
                text = inspect.getsource(type(src))
            hasher.update(text.encode())
        return hasher.hexdigest()

    def __hash__(self) -> int:  # functools.cache keys on instances: hash and compare as the class
        return hash(type(self))

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other)


class CallableInductorPass(InductorPass):
    """Wraps a plain function `fn(graph)` as a pass; the function's source is its uuid."""

    def __init__(self, fn: Callable[[fx.Graph], None], name: str | None = None):
        self.fn = fn
        self.name = name or fn.__name__

    def __call__(self, graph: fx.Graph) -> None:
        self.fn(graph)

    def uuid(self) -> str:
        return self.hash_source(self.fn)

    def __hash__(self) -> int:
        return hash(self.fn)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CallableInductorPass) and other.fn is self.fn


class PostGradPassManager(CustomGraphPass):
    """Applies registered passes in order; installed as Inductor's `post_grad_custom_post_pass`."""

    def __init__(self) -> None:
        self.passes: list[InductorPass] = []
        self.timings: dict[str, list[float]] = {}

    def add(self, pass_: InductorPass | Callable[[fx.Graph], None]) -> None:
        if not isinstance(pass_, InductorPass):
            if not callable(pass_):
                raise TypeError(f"a pass must be an InductorPass or a callable, got {pass_!r}")
            pass_ = CallableInductorPass(pass_)
        self.passes.append(pass_)

    register = add

    def __call__(self, graph: fx.Graph) -> None:
        for pass_ in self.passes:
            name = getattr(pass_, "name", type(pass_).__name__)
            start = time.perf_counter()
            pass_(graph)
            self.timings.setdefault(name, []).append(time.perf_counter() - start)

    def uuids(self) -> list[str]:
        return [p.uuid() for p in self.passes]

    def uuid(self) -> str:
        return InductorPass.hash_source(*self.uuids()) if self.passes else "no-passes"

    def __bool__(self) -> bool:
        return bool(self.passes)
