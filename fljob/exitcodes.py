"""Exit codes shared by the trainer, the launcher and the rendered batch scripts.

REQUEUE is EX_TEMPFAIL from sysexits.h: "try again later". The trainer exits with it after a
pre-kill signal once its checkpoint is committed; the SLURM trailer requeues only for it, and
the Kubernetes restart policy treats it as retryable.

DIVERGED is the trainer's "the loss or gradient norm became NaN/inf": it stopped without
committing that state. Nothing is retried (a rerun would diverge again); in a sweep it is an
outcome (this learning rate is too high), not a failure.
"""

OK = 0
FAILED = 1
USAGE = 2
DIVERGED = 3
REQUEUE = 75
