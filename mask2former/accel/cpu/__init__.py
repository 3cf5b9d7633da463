"""Accelerations that rest on CPU kernels and memory: oneDNN's channel-blocked layout
(``blocked.py``), the compiled fused frozen batch norm and deformable-attention ops, scratch
buffers that spare fresh allocations their page faults (``scratch.py``)."""
