"""Training metrics: optimizer statistics (:mod:`.optimizer_stats`) and their sinks."""
