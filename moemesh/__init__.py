"""moemesh: serve DeepSeek-V2/V3 MoE models with attention/expert disaggregation.

The client SDK is importable from here too (``from moemesh import MeshClient``), loaded lazily so
that ``import moemesh`` stays light.
"""

_SDK = ("MeshClient", "AsyncMeshClient", "MeshError", "GenerateResult", "TokenChunk", "TokenLogprob", "TopLogprob")


def __getattr__(name: str):
    if name in _SDK:
        from moemesh import router

        return getattr(router, name)
    raise AttributeError(f"module 'moemesh' has no attribute {name!r}")
