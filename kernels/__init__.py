"""Triton kernels, one file per fused op; installed as ``fastvae.kernels``.

Launchers take and return torch tensors; the autograd and dispatch live in ``fastvae.ops``.
"""
