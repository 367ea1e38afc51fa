"""Storage edge: fsspec stores with create-only and compare-and-swap writes, the run layout and its documents.

The public API is ``olss_dist.artifacts``; this package holds its parts.
"""
