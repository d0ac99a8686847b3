"""C libraries this package builds with the machine's compiler at first use (build.py): the CPU kernels and the
tcp frame loop load through it."""
