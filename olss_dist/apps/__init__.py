"""Applications over the library: scheduled refits (``refit``) and evaluation (``evaluate``)."""
