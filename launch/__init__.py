"""`launch`: the `dfq` command line and the cluster launch configs. May import `engine` and `quant`."""
