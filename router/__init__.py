"""moemesh router: the client-facing `moemesh.v1.Inference` service, and the Python SDK for it.

Only the SDK is imported here (it needs grpc and the stubs, nothing heavy): the router server lives in its own
module, imported by the CLI.
"""

from .client import (AsyncMeshClient, GenerateResult, MeshClient, MeshError, ModelInfo, TokenChunk, TokenLogprob,
                     TopLogprob, Usage)

__all__ = ["AsyncMeshClient", "GenerateResult", "MeshClient", "MeshError", "ModelInfo", "TokenChunk", "TokenLogprob",
           "TopLogprob", "Usage"]
