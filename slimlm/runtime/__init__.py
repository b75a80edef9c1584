"""Running compressed models fast: runnable forms of compressed layers (kernels) and `slimlm bench`."""
