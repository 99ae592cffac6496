"""The job spec: pydantic models, YAML loading with positions, `--set` overrides."""

from fljob.spec.loader import Problem, SpecError, dump_spec, load_spec, load_spec_text, problem_at
from fljob.spec.models import JobSpec

__all__ = ["JobSpec", "Problem", "SpecError", "dump_spec", "load_spec", "load_spec_text", "problem_at"]
