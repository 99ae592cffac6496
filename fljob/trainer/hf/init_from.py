"""``checkpoint.init_from``: start a run's model from another checkpoint's weights.

Precedence (:meth:`fljob.trainer.checkpoint.manager.FljobCheckpointManager.load`): this
run's own ``latest`` committed step first (resume, everything restored); only when there
is nothing of this run to resume are the model weights read from ``init_from``, at step 0,
with a fresh optimizer, schedule and data order. ``init_from`` is anything
``fljob export hf`` accepts as CHECKPOINT (a run folder, a checkpoint URI or one
``step-<N>`` of it; relative paths from the run folder, as ``checkpoint.uri``), e.g. what
``fljob import hf`` wrote. Shapes must match the run's model (the error names the tensor);
muP settings that differ from the ones the weights were made with are allowed but logged,
because the same weights then compute another function.
"""

from __future__ import annotations

from typing import Any

from torchtitan.tools.logging import logger

from fljob.spec.models import JobSpec
from fljob.trainer.hf.source import load_model_tensors, open_checkpoint

# Model fields that change what given weights compute (init_std only decides fresh weights).
_FUNCTION_FIELDS = ("mup", "attention_scale", "input_alpha", "output_alpha", "depth_alpha_exp",
                    "tie_embeddings")


def init_model_from(spec: JobSpec, model: Any) -> str | None:
    """Load ``spec.checkpoint.init_from``'s model weights into ``model`` (torchtitan's
    ``ModelWrapper``: a state dict of the run's possibly sharded parameters) on every rank;
    the step URI read, or None when the spec sets no ``init_from``."""
    location = getattr(spec.checkpoint, "init_from", None)
    if not location:
        return None
    source = open_checkpoint(location, step=None, storage=spec.storage,
                             base_dir=spec.resolved_run_dir)
    differ = [f"{name} {getattr(source.spec.model, name)!r} -> {getattr(spec.model, name)!r}"
              for name in _FUNCTION_FIELDS
              if getattr(source.spec.model, name) != getattr(spec.model, name)]
    if differ:
        logger.warning(f"checkpoint.init_from {source.uri} was made with other muP settings "
                       f"({', '.join(differ)}): its weights compute another function here")
    state = model.state_dict()
    load_model_tensors(source, state, distributed=True)
    model.load_state_dict(state)
    logger.info(f"Initialised the model from {source.uri} (checkpoint.init_from; nothing of "
                "this run to resume)")
    return source.uri
