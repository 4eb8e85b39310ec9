"""Warm the shared compile cache of a model: the entrypoint of `ray job submit`.

    ray job submit --working-dir . -- python jobs/warm_cache.py --model llama-3-8b --tp 8 \\
        --sizes 1,2,4,8,16,32,64,128,256,512 --cache s3://bucket/vcr

The options are those of `vcr warm` (`python jobs/warm_cache.py --help`); both call
`vllm_compile_ray.orchestration.warm`. Exit status 1 when any compile failed or timed out. VCR_CACHE and
VCR_STORAGE_OPTIONS (JSON) are the defaults of --cache and --storage-options.
"""

from __future__ import annotations

import argparse
import sys

from vllm_compile_ray.cli import commands as cli


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return cli.parse_warm_args(sys.argv[1:] if argv is None else argv)


def main(argv: list[str] | None = None) -> int:
    return cli.main(["warm", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
