"""A Hugging Face Hub model id as a model spec: `--model Qwen/Qwen3-8B`, as `vllm serve` takes it.

    vcr warm --model meta-llama/Llama-3.1-8B-Instruct --tp 8 --sizes 1,8,64 --cache s3://b/vcr
    vcr load --model meta-llama/Llama-3.1-8B-Instruct --tp 8 --rank 0 --weights meta-llama/Llama-3.1-8B-Instruct

Planning and warming fetch the repository's config.json only (kilobytes, into the Hub cache every
node already shares with transformers); `--weights <id>` fetches its safetensors. An existing
local path of the same spelling wins. Offline (`HF_HUB_OFFLINE=1`) the Hub cache answers; a
gated repository takes `HF_TOKEN`. Any failure is a `ConfigError` naming the id and the reason.
"""

from __future__ import annotations

import os
import re

from ..errors import ConfigError

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}\Z")


def is_hub_id(spec: object) -> bool:
    """`spec` spells "org/name" and names no local file or directory."""
    return (isinstance(spec, str) and bool(_HUB_ID.match(spec)) and not spec.endswith(".json")
            and not os.path.exists(spec))


def config_path(repo_id: str) -> str:
    """The local path of `repo_id`'s config.json, fetched into the Hub cache if not there."""
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(repo_id, "config.json")
    except Exception as exc:  # noqa: BLE001 (network, auth, missing repo or file: one message)
        raise ConfigError(_why(repo_id, "config.json", exc)) from None


def snapshot(repo_id: str) -> str:
    """A local directory with `repo_id`'s config and safetensors weights (fetched if needed)."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors"])
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(_why(repo_id, "weights", exc)) from None


def _why(repo_id: str, what: str, exc: Exception) -> str:
    reason = " ".join(str(exc).split())[:300]
    hint = ("it is not in the Hub cache and HF_HUB_OFFLINE is set"
            if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
            else "check the id, the network, and HF_TOKEN for a gated repository")
    return (f"model {repo_id!r} is no preset or local path, so it was taken as a Hugging Face Hub "
            f"id, but its {what} could not be fetched ({type(exc).__name__}: {reason}); {hint}; "
            "or give a local config.json or checkpoint directory")
