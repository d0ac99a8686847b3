"""Launching on one machine: the embedded single process, local node processes, the embedded etcd.

Above the roles, like ``cli/``: these modules wire roles together; the core never imports them.
"""
