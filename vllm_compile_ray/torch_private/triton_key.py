"""Triton's build hash, computed in the background while a rank starts.

Inductor keys autotune results by a hash of Triton's install and backend
(`torch.utils._triton.triton_hash_with_backend`, cached per process): a loader computes it when
its first artifact's autotune results go into Inductor's cache. Checked on torch 2.11 and 2.13.
"""

from __future__ import annotations

import contextlib
import threading


def start(device_type: str) -> threading.Thread | None:
    """Start hashing Triton's build (`triton_hash_with_backend`, cached per process) in a
    background thread, CUDA only; returns the thread (None: nothing to hash).

    Inductor asks for the hash when a loader's first autotune results go into its cache
    (`autotune_cache.inductor_meta_from_config`). It reads and sha256-hashes Triton's install:
    0.44 s of a 32-layer rank's load on one H100 (cProfile, session 26). Reading files and
    hashing large buffers release the GIL, so the hash is ready by the time the rank has traced
    and fetched. A failure here (no CUDA driver) is left to the call Inductor makes itself,
    which handles it.
    """
    if device_type != "cuda":
        return None
    from torch.utils._triton import has_triton, triton_hash_with_backend

    if not has_triton():
        return None

    def run() -> None:
        with contextlib.suppress(Exception):  # Inductor's own call meets and handles the error
            triton_hash_with_backend()

    thread = threading.Thread(target=run, name="vcr-triton-key", daemon=True)
    thread.start()
    return thread
