"""Storage edge: calibrated runs in any fsspec store (publish once, read by URI, verify every byte).

- ``stores``: ``open_store`` and the ``Store`` protocol (create-only files, compare-and-swap, timeouts).
- ``layout``: the run directory, its file names, ``manifest.json`` and ``latest.json`` documents.
- ``runs``: publish, resolve, fetch, pull and list runs (the public API, re-exported here).
- ``errors``: ``ArtifactError`` and the mapping of storage exceptions onto it.
"""

from olss_dist.artifacts.runs import *  # noqa: F403 -- the package's public API is runs.__all__
from olss_dist.artifacts.runs import __all__  # noqa: F401
