"""Test-only worker behaviour for the SLURM integration tests, loaded through PYTHONPATH.

The product's job task (`fljob doctor --distributed`) finishes in seconds; the cancel,
requeue and pre-kill-signal tests need a step that keeps running, asks to be requeued, or
reacts to SIGUSR2 the way the trainer does. The test puts this folder on the job's PYTHONPATH
(spec `env`), so Python imports this module at start-up in every process of the job. It acts
only in torchrun workers (LOCAL_RANK and TORCHELASTIC_RUN_ID set) and only when
FLJOB_TEST_WORKER is set; markers go to FLJOB_TEST_MARKERS:

  hang    write started-r<rank>-a<attempt>-p<pid>, then sleep (a long training step)
  exit75  exit 75 at once: "checkpoint committed, requeue me" (fljob.exitcodes.REQUEUE)
  usr2    write the started marker and sleep; on SIGUSR2 write usr2-r<rank>-a<attempt> and
          exit 75, as the trainer does after its emergency checkpoint
"""

import os

_mode = os.environ.get("FLJOB_TEST_WORKER")
if _mode and "LOCAL_RANK" in os.environ and "TORCHELASTIC_RUN_ID" in os.environ:
    import signal
    import time
    from pathlib import Path

    _rank = os.environ.get("RANK", "?")
    _attempt = os.environ.get("SLURM_RESTART_COUNT", "0")
    _markers = Path(os.environ.get("FLJOB_TEST_MARKERS", "."))

    def _mark(name: str) -> None:
        _markers.mkdir(parents=True, exist_ok=True)
        (_markers / name).write_text(f"{os.getpid()}\n")

    if _mode == "exit75":
        print(f"test worker rank={_rank} attempt={_attempt}: exit 75", flush=True)
        os._exit(75)

    if _mode == "usr2":
        def _on_usr2(signum, frame):
            _mark(f"usr2-r{_rank}-a{_attempt}")
            print(f"test worker rank={_rank} attempt={_attempt}: SIGUSR2, exit 75", flush=True)
            os._exit(75)

        signal.signal(signal.SIGUSR2, _on_usr2)

    if _mode in ("hang", "usr2"):
        _mark(f"started-r{_rank}-a{_attempt}-p{os.getpid()}")
        print(f"test worker rank={_rank} attempt={_attempt}: running", flush=True)
        while True:
            time.sleep(1)
