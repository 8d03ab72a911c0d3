"""One module per fused op: the PyTorch reference, the autograd.Function and the dispatch.

Accelerated implementations register with ``fastvae.backends`` here, lazily: importing
fastvae compiles and launches nothing.
"""
