#!/usr/bin/env bash
# Regenerate the committed gRPC/protobuf stubs under moemesh/v1/ from proto/moemesh/v1/*.proto.
# tests/unit/test_proto_stubs.py fails when the committed stubs differ from what this writes.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${MOEMESH_VENV:-$root/.venv}"
if [ -x "$venv/bin/python" ]; then python="$venv/bin/python"; else python="${PYTHON:-python3}"; fi
cd "$root"
# -I proto with files at proto/moemesh/v1/*.proto: the generated *_pb2_grpc.py then imports
# `from moemesh.v1 import ..._pb2`, which matches the installed package.
"$python" -m grpc_tools.protoc -I proto \
  --python_out=. --grpc_python_out=. --pyi_out=. \
  proto/moemesh/v1/*.proto
echo "generated: $(ls moemesh/v1/*_pb2*.py* | tr '\n' ' ')"
