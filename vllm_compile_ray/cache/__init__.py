"""The shared artifact cache: the fsspec store, artifacts, manifests, signing, node-local staging."""
