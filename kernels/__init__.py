"""Triton kernels with pure-torch references, installed as ``softprompt.kernels``."""
