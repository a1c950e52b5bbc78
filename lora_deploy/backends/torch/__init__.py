"""PyTorch eager (and CUDA graphs): the runner and timed calls."""
