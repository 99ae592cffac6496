"""Training metrics: optimizer statistics (:mod:`.optimizer_stats`) and their sinks."""

VALIDATION_LOSS = "validation_loss"
"""The key that marks a sink's record as a held-out evaluation, not a training step (see
:mod:`.processor`)."""
