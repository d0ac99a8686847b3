"""Generated protobuf/gRPC stubs for the moemesh.v1 wire contract (proto/moemesh/v1/*.proto).

Regenerate with scripts/gen-proto.sh; never edit the *_pb2* files by hand.
"""
