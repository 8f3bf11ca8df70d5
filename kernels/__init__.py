"""leanserve Triton kernels and their plain-torch references. Imports nothing else of leanserve."""
