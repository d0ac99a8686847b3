"""The control plane's shared state: the etcd registry, its keys and records, the cluster view, placement."""
