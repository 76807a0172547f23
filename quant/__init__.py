"""`quant`: post-training quantization of CNNs and ViTs calibrated on shard pools (SHARDS.md).

It never imports `engine`: the two share only the shard format.
"""
