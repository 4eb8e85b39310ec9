"""A checkpoint's tensor names in the model's terms, by transformers' own conversion mapping.

transformers renames checkpoint tensors as it loads them (`conversion_mapping`): an
image-text-to-text checkpoint's `language_model.model.` becomes `model.language_model.`, a
checkpoint saved without the base model's prefix gets it, MiniMax's `block_sparse_moe` becomes
`mlp`; and it merges each expert's tensors into fused experts (MergeModulelist + Concatenate),
reading `w1`/`w3` or `gate_proj`/`up_proj` as the model declares. `Names` applies those renames
and names each expert's tensors as the merge reads them, so that `hf_shards` reads a rank's slices
of such checkpoints by name. Conversions that change values (Chunk, Transpose, PermuteForRope,
...) it does not apply: `hf_shards.readable` is False for those checkpoints and they load through
`from_pretrained`.
"""

from __future__ import annotations

import re
from typing import Any

from torch import nn

# A merge's source pattern of one expert's tensor, e.g. ".experts.*.w1.weight"
_MERGED = re.compile(r"experts\.\*\.([^.]+)\.weight$")
_FUSED = ("gate_up_proj", "down_proj")


class Names:
    def __init__(self, model: nn.Module):
        self.renamings: list[Any] = []
        self.parts: dict[str, tuple[str, ...]] = {}
        self.prefix = getattr(model, "base_model_prefix", None) or None
        self.state = model.state_dict()  # meta tensors: which names the model has
        self._rename = None
        try:
            from transformers.conversion_mapping import get_model_conversion_mapping
            from transformers.core_model_loading import (WeightConverter, WeightRenaming,
                                                         rename_source_key)
        except ImportError:  # a transformers without conversions: the names as stored
            return
        self._rename = rename_source_key
        transforms = get_model_conversion_mapping(model)
        self.renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        for t in transforms:
            if not isinstance(t, WeightConverter) or len(t.target_patterns) != 1:
                continue
            target = t.target_patterns[0].rsplit(".", 1)[-1]
            parts = [_MERGED.search(s) for s in t.source_patterns]
            if target in _FUSED and parts and all(parts):
                self.parts[target] = tuple(m.group(1) for m in parts)

    def model_name(self, stored: str) -> str:
        """The model's name for checkpoint tensor `stored` (itself when nothing renames it)."""
        if self._rename is None:
            return stored
        # Positional: the prefix parameter's name differs between transformers 5 releases.
        return self._rename(stored, self.renamings, [], self.prefix, self.state)[0]

    def expert_parts(self, proj: str) -> tuple[str, ...]:
        """Each expert's tensors that fused `proj` (gate_up_proj or down_proj) merges, in
        order."""
        default = ("down_proj",) if proj == "down_proj" else ("gate_proj", "up_proj")
        return self.parts.get(proj, default)
