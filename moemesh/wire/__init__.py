"""On the wire: the tensor codec, torch.distributed frames, request decoding, TLS, gRPC servers and options."""
