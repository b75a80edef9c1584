"""Pure tensor math, no I/O and no training loop: N:M masks, masked parametrizations, low-rank
factorizations, quantization codes, SLoRB side paths, factorized layers, FSDP row shards."""
