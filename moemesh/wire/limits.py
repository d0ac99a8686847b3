"""Every gRPC message-size limit of the mesh, servers' and clients', each with where its number comes from.

A server refuses a larger message with RESOURCE_EXHAUSTED (that call ends; the server keeps serving). The
expert node's limit is not a constant: it follows from the largest step an attention node computes
(:func:`dispatch_message_bytes`), so a peer cannot make it buffer more than one legitimate message.

Clients dial with :func:`client_options`: sizes that match the server they call, keepalive and reconnect
backoff, one table instead of one list per caller.
"""

from __future__ import annotations

import math

KIB, MIB = 1 << 10, 1 << 20

# ---- servers ---------------------------------------------------------------------------------------------
# router (Inference): a prompt is text of at most MAX_TEXT_CHARS = 1 Mi characters (router/server.py), at most
# 4 bytes each in UTF-8 (4 MiB), or token ids (163840 positions x 5-byte varints < 1 MiB), plus stop strings;
# 16 MiB leaves 4x room. Its largest answer, ClusterStatus of a large mesh, is far smaller.
ROUTER_MAX_MESSAGE_BYTES = 16 * MIB
# attention node (AttentionNode): what the router accepted, plus resume_token_ids (at most the context:
# 163840 x 5-byte varints < 1 MiB) after a failover; 4 MiB of room for those.
ATTN_MAX_MESSAGE_BYTES = ROUTER_MAX_MESSAGE_BYTES + 4 * MIB
# MeshControl: requests are a count or a name; a ListProcesses answer is ~60 bytes per process.
CONTROL_MAX_MESSAGE_BYTES = 1 * MIB
# the plaintext health port: grpc.health.v1 requests name a service, answers carry one status.
HEALTH_MAX_MESSAGE_BYTES = 64 * KIB
# expert node: computed per node, see dispatch_message_bytes. A DispatchRequest's bytes besides its three
# tensors (id, layer, version, dtype tags, shapes, field tags) are under 100; 1 MiB covers them with room.
DISPATCH_MARGIN_BYTES = 1 * MIB
WIDEST_HIDDEN_ITEMSIZE = 4  # float32: the widest hidden dtype an expert node accepts (whatever it computes in)
TOPK_ROW_ITEMSIZE = 8 + 4  # per (row, expert): an int64 id (int32 also accepted) and a float32 gate weight
GRPC_MAX_MESSAGE_BYTES = (1 << 31) - 1  # gRPC's limits are int32: no server or client can take more
EXPERT_CLIENT_MAX_BYTES = 256 * MIB  # see CLIENT_OPTIONS["expert"]

# Attention nodes' default --max-batched-tokens (moemesh/cli/flags.py), and so expert nodes' default too.
DEFAULT_MAX_BATCHED_TOKENS = 512

# ---- etcd (a server we do not build) ----------------------------------------------------------------------
# etcd refuses requests over --max-request-bytes (1.5 MiB by default); a read can return many node records
# and the placement (itself one value under that limit) at once: 16 MiB.
ETCD_MAX_SEND_BYTES = 2 * MIB
ETCD_MAX_RECEIVE_BYTES = 16 * MIB


def dispatch_message_bytes(rows: int, hidden_size: int, top_k: int,
                           hidden_itemsize: int = WIDEST_HIDDEN_ITEMSIZE) -> int:
    """The largest DispatchRequest of ``rows`` rows, with margin: hidden [rows, D], ids and weights [rows, K].

    Its response (partial rows [<= rows, D] in hidden's dtype) is smaller. An expert node serving steps of up to
    ``rows`` tokens (the attention nodes' --max-batched-tokens: one message per node per MoE layer carries at
    most a step's rows) takes and sends messages of this size.
    """
    if rows < 1 or hidden_size < 1 or top_k < 0 or hidden_itemsize < 1:
        raise ValueError(f"rows, hidden_size and hidden_itemsize must be >= 1 and top_k >= 0, got "
                         f"{rows}, {hidden_size}, {hidden_itemsize}, {top_k}")
    size = rows * _row_bytes(hidden_size, top_k, hidden_itemsize) + DISPATCH_MARGIN_BYTES
    if size > GRPC_MAX_MESSAGE_BYTES:
        raise ValueError(f"a message of {rows} rows of {hidden_size} would be {size} bytes, over gRPC's 2 GiB "
                         "limit: lower --max-batched-tokens")
    return size


def dispatch_rows_within(max_message_bytes: int, hidden_size: int, top_k: int, hidden_itemsize: int) -> int:
    """How many rows one DispatchRequest may carry under an expert node's ``max_message_bytes`` (>= 1)."""
    room = max_message_bytes - DISPATCH_MARGIN_BYTES
    return max(1, math.floor(room / _row_bytes(hidden_size, top_k, hidden_itemsize)))


def _row_bytes(hidden_size: int, top_k: int, hidden_itemsize: int) -> int:
    return hidden_size * hidden_itemsize + top_k * TOPK_ROW_ITEMSIZE


# ---- clients ----------------------------------------------------------------------------------------------
# Keepalive pings every 20 s on idle connections too. moemesh servers accept pings half as far apart
# (wire/server.py: server_keepalive): gRPC's default server policy accepts one per 5 minutes without calls and
# answers the third early one with GOAWAY too_many_pings, which an idle mesh met after about a minute.
KEEPALIVE_MS = 20_000


def client_keepalive(keepalive_ms: int = KEEPALIVE_MS) -> tuple[tuple[str, int], ...]:
    """A client's pings: every ``keepalive_ms`` with or without calls, for as long as the connection is idle (gRPC
    stops after 2 without data by default, so a silently dropped idle connection went unnoticed until the next
    call), dead after half the interval without an answer."""
    return (("grpc.keepalive_time_ms", keepalive_ms), ("grpc.keepalive_timeout_ms", max(keepalive_ms // 2, 1)),
            ("grpc.keepalive_permit_without_calls", 1), ("grpc.http2.max_pings_without_data", 0))


def server_keepalive(keepalive_ms: int = KEEPALIVE_MS) -> tuple[tuple[str, int], ...]:
    """What a server sends and accepts, matching :func:`client_keepalive` of the same ``keepalive_ms``: it pings
    idle clients as often, accepts their pings without calls down to half the interval (gRPC's timers jitter),
    and never caps pings sent without data."""
    return (*client_keepalive(keepalive_ms), ("grpc.http2.min_ping_interval_without_data_ms", max(keepalive_ms // 2, 1)))


_KEEPALIVE = client_keepalive()
# A restarted peer is reachable again within a second, not after gRPC's backoff that grows to 120 s.
_FAST_RECONNECT = (("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
                   ("grpc.max_reconnect_backoff_ms", 1000))

# Per kind of peer dialled: (max send, max receive) and the other options.
CLIENT_OPTIONS: dict[str, tuple[tuple[int, int], tuple[tuple[str, int], ...]]] = {
    # router -> attention node (router/pool.py): sends what the attention node takes, receives tokens/loads
    "attn": ((ATTN_MAX_MESSAGE_BYTES, ROUTER_MAX_MESSAGE_BYTES), (*_KEEPALIVE, *_FAST_RECONNECT)),
    # attention node -> expert node (attn_node/experts/remote_backend.py): it cuts each message to the node's
    # own limit (Info.max_message_bytes) and to this one, and a reply is no larger than its request: the cap
    # of a 8192-token step of a 7168-wide model (DeepSeek-V3) in float32 (235 MB), with margin.
    "expert": ((EXPERT_CLIENT_MAX_BYTES, EXPERT_CLIENT_MAX_BYTES), _KEEPALIVE),
    # any moemesh process -> etcd (control/etcd.py); etcd refuses pings less than 5 s apart
    "etcd": ((ETCD_MAX_SEND_BYTES, ETCD_MAX_RECEIVE_BYTES),
             (("grpc.keepalive_time_ms", 10_000), ("grpc.keepalive_timeout_ms", 5_000), *_FAST_RECONNECT)),
}


def client_options(peer: str, keepalive_ms: int | None = None) -> list[tuple[str, int]]:
    """Channel options for dialling a ``peer``: a key of CLIENT_OPTIONS; ``keepalive_ms`` replaces the table's
    keepalive (tests: seconds, not minutes, of idleness)."""
    (send, receive), rest = CLIENT_OPTIONS[peer]
    if keepalive_ms is not None:
        ours = {name for name, _ in client_keepalive()}
        rest = (*(o for o in rest if o[0] not in ours), *client_keepalive(keepalive_ms))
    return [("grpc.max_send_message_length", send), ("grpc.max_receive_message_length", receive), *rest]
