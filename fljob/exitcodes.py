"""Exit codes shared by the trainer, the launcher and the rendered batch scripts.

REQUEUE is EX_TEMPFAIL from sysexits.h: "try again later". The trainer exits with it after a
pre-kill signal once its checkpoint is committed; the SLURM trailer requeues only for it, and
the Kubernetes restart policy treats it as retryable.
"""

OK = 0
FAILED = 1
USAGE = 2
REQUEUE = 75
