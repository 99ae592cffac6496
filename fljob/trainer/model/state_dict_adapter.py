"""Conversion between our state dict and a Hugging Face ``LlamaForCausalLM`` checkpoint.

This is torchtitan's adapter protocol (``--checkpoint.last_save_in_hf`` and
``--checkpoint.initial_load_in_hf``) over :mod:`fljob.trainer.hf.folding`, which holds the
names and the folding rules: the exported checkpoint computes the same function as our
model in a stock HF Llama. Models a stock HF Llama cannot express (embedding norm,
peri-norms, a tied embedding with an input multiplier) raise ``ValueError`` here:
``check_hf_compatible`` lets a job fail at startup instead of at its final save, and
``fljob export hf`` ships them with their own model code instead.
"""

from __future__ import annotations

from typing import Any

from torchtitan.protocols.state_dict_adapter import StateDictAdapter

from fljob.trainer.hf import folding
from fljob.trainer.hf.folding import check_hf_compatible
from fljob.trainer.model.args import ModelArgs

__all__ = ["MuPLlamaStateDictAdapter", "check_hf_compatible"]


class MuPLlamaStateDictAdapter(StateDictAdapter):
    """torchtitan 0.2.2 state-dict adapter for ``MuPTransformer`` <-> stock HF Llama."""

    def __init__(self, model_args: ModelArgs, hf_assets_path: str | None) -> None:
        super().__init__(model_args, hf_assets_path)  # type: ignore[arg-type]
        self.model_args = model_args

    def to_hf(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """Our keys -> HF keys, muP multipliers folded in; a tied output is omitted."""
        check_hf_compatible(self.model_args)
        return folding.to_hf(state_dict, self.model_args)

    def from_hf(self, hf_state_dict: dict[str, Any]) -> dict[str, Any]:
        """HF keys -> our keys, muP multipliers divided out; a tied output is the embedding."""
        check_hf_compatible(self.model_args)
        return folding.from_hf(hf_state_dict, self.model_args)
