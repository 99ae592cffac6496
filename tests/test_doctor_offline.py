"""`fljob doctor` pieces that need no cluster: SLURM time parsing and start-up imports.
(The checks themselves run against real SLURM, S3 and kubectl in tests/integration/test_doctor.py.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fljob.doctor import slurm_seconds

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(("text", "seconds"), [
    ("30", 30 * 60),                       # minutes
    ("30:15", 30 * 60 + 15),               # minutes:seconds
    ("04:00:00", 4 * 3600),                # hours:minutes:seconds
    ("2-12", (2 * 24 + 12) * 3600),        # days-hours
    ("1-02:30", (26 * 60 + 30) * 60),      # days-hours:minutes
    ("1-00:00:01", 24 * 3600 + 1),         # days-hours:minutes:seconds
    ("UNLIMITED", None),
    ("INFINITE", None),
])
def test_slurm_seconds_reads_every_slurm_form(text: str, seconds: int | None) -> None:
    assert slurm_seconds(text) == seconds


def test_doctor_without_s3_imports_neither_boto3_nor_torch() -> None:
    """The preflight must answer fast: boto3 only for s3:// URIs, torch never (find_spec only)."""
    code = ("import sys; from fljob import cli; rc = cli.main(['doctor', sys.argv[1]]); "
            "print(sorted({'torch', 'boto3', 'botocore'} & set(sys.modules)), rc, file=sys.stderr)")
    done = subprocess.run([sys.executable, "-c", code, str(REPO / "configs" / "local.yaml")],
                          capture_output=True, text=True, check=False)
    assert done.stderr.strip().splitlines()[-1] == "[] 0", done.stdout + done.stderr
