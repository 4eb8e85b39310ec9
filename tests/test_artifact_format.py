"""The bytes of a standalone Inductor artifact and loading them (artifact_format.py), on a real
CPU artifact of this torch."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx

from vllm_compile_ray.torch_private import artifact_format, inductor

pytestmark = pytest.mark.skipif(not artifact_format.save_options(),
                                reason="this torch makes no bundled AOT artifact")


class _Piece(torch.nn.Module):
    def forward(self, x, w):
        return (torch.relu(x @ w) * 2 + 1,)


@pytest.fixture(scope="module")
def bundled() -> tuple[bytes, list[torch.Tensor]]:
    args = [torch.randn(4, 8), torch.randn(8, 8)]
    _, data = inductor.compile_static(fx.symbolic_trace(_Piece()), args, {})
    return data, args


def test_compiles_make_bundled_artifacts_that_load_in_memory(bundled, monkeypatch) -> None:
    data, args = bundled
    assert artifact_format.is_bundled(data)
    header, _, payload = artifact_format.fields(data)
    assert bytes(header) == artifact_format.aot_header() and len(payload) > 0

    def no_file(_: bytes):
        raise AssertionError("a bundled artifact went through torch's file loader")

    monkeypatch.setattr(artifact_format, "_load_through_file", no_file)
    out = artifact_format.load(data)(*args)
    assert isinstance(out, (tuple, list)) and torch.allclose(out[0], _Piece()(*args)[0])


def test_a_truncated_artifact_is_refused_naming_the_field(bundled) -> None:
    data, _ = bundled
    with pytest.raises(ValueError, match="truncated"):
        artifact_format.load(data[:-10])


def test_an_artifact_of_another_torch_build_is_refused(bundled) -> None:
    data, _ = bundled
    header, key, payload = (bytes(f) for f in artifact_format.fields(data))
    from torch.utils._appending_byte_serializer import BytesWriter

    writer = BytesWriter()
    for field in (header, b"x" * len(key), payload):
        writer.write_bytes(field)
    with pytest.raises(ValueError, match="another torch build"):
        artifact_format.load(writer.to_bytes())
