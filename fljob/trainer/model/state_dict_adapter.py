"""Conversion between our state dict and a Hugging Face ``LlamaForCausalLM`` checkpoint.

The exported checkpoint computes the same function as our model in a stock HF Llama:
muP multipliers that HF Llama lacks are folded into weights on export and divided out on
import (``hf_fold_factors``). Our RoPE already uses HF's rotate-half layout, so q/k need
no permutation. Models whose extra norms HF Llama cannot express (embedding norm,
peri-norms), or a tied embedding with an input multiplier, raise ``ValueError``:
``check_hf_compatible`` lets a job fail at startup instead of at its final save.
"""

from __future__ import annotations

import math
import re
from typing import Any

from torchtitan.protocols.state_dict_adapter import StateDictAdapter

from fljob.trainer.model.args import ModelArgs

_LAYER = re.compile(r"layers\.(\d+)\.(.+)")
_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
_TOP_LEVEL = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_PER_LAYER = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_FROM_HF_TOP = {v: k for k, v in _TOP_LEVEL.items()}
_FROM_HF_LAYER = {v: k for k, v in _PER_LAYER.items()}
# Buffers some HF checkpoints carry; recomputed by the model, never loaded.
_HF_IGNORED_LAYER_KEYS = {"self_attn.rotary_emb.inv_freq"}


def check_hf_compatible(args: ModelArgs) -> None:
    """Raise ValueError if a plain HF Llama cannot compute this model's function."""
    problems = []
    if args.use_embedding_norm:
        problems.append("use_embedding_norm (HF Llama has no norm after the embedding)")
    if args.use_peri_norm:
        problems.append("use_peri_norm (HF Llama has no norm on the residual branches)")
    if args.tie_word_embeddings and args.input_mult != 1.0:
        problems.append("a tied embedding with input_alpha != 1 (the multiplier cannot "
                        "be folded into a weight the output layer shares)")
    if problems:
        raise ValueError("not exportable as a Hugging Face Llama: " + "; ".join(problems))


def hf_fold_factors(args: ModelArgs) -> dict[str, float]:
    """Factor by which each of our (layer-relative) keys is multiplied on export.

    input multiplier -> embedding; residual multiplier -> wo and w2 (the last linear of
    each branch); logit multiplier -> final norm gain; attention scale relative to HF's
    1/sqrt(head_dim) -> wq (RoPE is linear, so scaling q before it is the same).
    """
    return {
        "tok_embeddings.weight": args.input_mult,
        "norm.weight": args.output_mult,
        "attention.wq.weight": args.attn_scale * math.sqrt(args.head_dim),
        "attention.wo.weight": args.residual_mult,
        "feed_forward.w2.weight": args.residual_mult,
    }


def _scaled(value: Any, factor: float) -> Any:
    return value if factor == 1.0 else value * factor


class MuPLlamaStateDictAdapter(StateDictAdapter):
    """torchtitan 0.2.2 state-dict adapter (``--checkpoint.last_save_in_hf`` and
    ``--checkpoint.initial_load_in_hf``) for ``MuPTransformer``."""

    def __init__(self, model_args: ModelArgs, hf_assets_path: str | None) -> None:
        super().__init__(model_args, hf_assets_path)  # type: ignore[arg-type]
        self.model_args = model_args

    def to_hf(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """Our keys -> HF keys, muP multipliers folded in; a tied output is omitted."""
        args = self.model_args
        check_hf_compatible(args)
        factors = hf_fold_factors(args)
        hf: dict[str, Any] = {}
        for key, value in state_dict.items():
            if key == "output.weight" and args.tie_word_embeddings:
                continue
            match = _LAYER.fullmatch(key)
            if match:
                layer, rest = match.groups()
                hf[f"model.layers.{layer}.{_PER_LAYER[rest]}"] = _scaled(
                    value, factors.get(rest, 1.0))
            else:
                hf[_TOP_LEVEL[key]] = _scaled(value, factors.get(key, 1.0))
        return hf

    def from_hf(self, hf_state_dict: dict[str, Any]) -> dict[str, Any]:
        """HF keys -> our keys, muP multipliers divided out; a tied output is the embedding."""
        args = self.model_args
        check_hf_compatible(args)
        factors = hf_fold_factors(args)
        state: dict[str, Any] = {}
        for hf_key, value in hf_state_dict.items():
            match = _HF_LAYER.fullmatch(hf_key)
            if match:
                layer, rest = match.groups()
                if rest in _HF_IGNORED_LAYER_KEYS:
                    continue
                key = _FROM_HF_LAYER[rest]
                state[f"layers.{layer}.{key}"] = _scaled(value, 1.0 / factors.get(key, 1.0))
            else:
                key = _FROM_HF_TOP[hf_key]
                if key == "output.weight" and args.tie_word_embeddings:
                    continue  # some tied HF checkpoints store lm_head anyway
                state[key] = _scaled(value, 1.0 / factors.get(key, 1.0))
        if args.tie_word_embeddings and "tok_embeddings.weight" in state:
            state["output.weight"] = state["tok_embeddings.weight"]
        return state
