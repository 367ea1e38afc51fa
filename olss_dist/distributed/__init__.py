"""The Ray edge of the pipeline: worker actors, streaming TSQR merge, parallel planning, checkpoints."""
