"""The job spec: pydantic models, YAML loading with positions, `--set` overrides."""

from fljob.spec.loader import Problem, SpecError, dump_spec, load_spec, load_spec_text
from fljob.spec.models import JobSpec

__all__ = ["JobSpec", "Problem", "SpecError", "dump_spec", "load_spec", "load_spec_text"]
