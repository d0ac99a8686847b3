"""The attention node's side of the routed experts: backends that move rows to expert nodes and back.

``remote_backend`` (gRPC ``Dispatch`` links, the replica split, failover within a step), ``torch_link``
(the same link interface over torch.distributed pair groups), ``replica_routes`` (which node takes each
row, pure), ``switchable_backend`` (a new placement's backend installed between engine steps).
"""
