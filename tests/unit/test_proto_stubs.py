"""The stubs committed under moemesh/v1/ are exactly what scripts/gen-proto.sh writes from proto/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROTO_DIR = ROOT / "proto" / "moemesh" / "v1"
STUB_DIR = ROOT / "moemesh" / "v1"
STUB_GLOBS = ("*_pb2.py", "*_pb2_grpc.py", "*_pb2.pyi")
FIX = "stubs are stale: run scripts/gen-proto.sh and commit moemesh/v1/"


def _stubs(folder: Path) -> dict[str, str]:
    return {p.name: p.read_text() for pattern in STUB_GLOBS for p in sorted(folder.glob(pattern))}


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory) -> dict[str, str]:
    pytest.importorskip("grpc_tools")
    out = tmp_path_factory.mktemp("stubs")
    protos = sorted(p.relative_to(ROOT / "proto").as_posix() for p in PROTO_DIR.glob("*.proto"))
    assert protos, f"no .proto files under {PROTO_DIR}"
    # Same invocation as scripts/gen-proto.sh (run from the repo root, -I proto, relative paths),
    # so the proto paths embedded in the generated code match.
    proc = subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I", "proto",
         f"--python_out={out}", f"--grpc_python_out={out}", f"--pyi_out={out}",
         *(f"proto/{p}" for p in protos)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, f"protoc failed:\n{proc.stderr}"
    return _stubs(out / "moemesh" / "v1")


def test_every_proto_has_committed_stubs_and_no_orphans(regenerated):
    committed = _stubs(STUB_DIR)
    missing = sorted(set(regenerated) - set(committed))
    orphans = sorted(set(committed) - set(regenerated))
    assert not missing, f"{FIX} (missing: {missing})"
    assert not orphans, f"stubs without a .proto: {orphans}; delete them or restore their .proto"


def test_committed_stubs_match_regenerated(regenerated):
    committed = _stubs(STUB_DIR)
    stale = sorted(name for name, text in regenerated.items() if committed.get(name) != text)
    assert not stale, f"{FIX} (differs: {stale})"


def test_stubs_import_under_the_package_name():
    from moemesh.v1 import dispatch_pb2, dispatch_pb2_grpc, tensor_pb2

    assert dispatch_pb2.DESCRIPTOR.package == "moemesh.v1"
    assert dispatch_pb2.DispatchRequest.DESCRIPTOR.fields_by_name["hidden"].message_type is tensor_pb2.Tensor.DESCRIPTOR
    assert hasattr(dispatch_pb2_grpc, "ExpertDispatchStub")
    assert hasattr(dispatch_pb2_grpc, "ExpertDispatchServicer")
    assert hasattr(dispatch_pb2_grpc, "add_ExpertDispatchServicer_to_server")
