"""Where fljob's muP Llama lands in a Hugging Face Llama checkpoint: names and folded multipliers.

A Hugging Face Llama computes ``lm_head(norm(h))`` with ``1/sqrt(head_dim)`` attention and
plain residual sums; fljob's model adds muP/CompleteP multipliers (``MUP.md``). Every
multiplier that sits next to a weight in a linear position is folded into that weight on
export and divided out on import, so the exported weights compute the same function:

| multiplier | folded into |
|---|---|
| input ``input_alpha`` | ``embed_tokens`` (``embed_tokens.norm`` gain with an embedding norm) |
| residual ``L^-a`` | ``o_proj``/``down_proj`` (the peri-norm gains when there are peri-norms) |
| logit ``output_alpha/m`` | the final norm gain (``model.norm``) |
| attention ``1/head_dim`` vs HF's ``1/sqrt(head_dim)`` | ``q_proj`` (RoPE is linear) |

One multiplier cannot be folded: the input multiplier of a tied embedding without an
embedding norm (the output layer shares the weight). It stays a number in the config
(``embedding_multiplier``). That case, the embedding norm and the peri-norms have no stock
Llama equivalent; they need the remote-code model of :mod:`.modeling_fljob_llama`, whose
extra tensors are named here too (``*.norm.weight`` under the module they follow).
"""

from __future__ import annotations

import math
import re
from typing import Any

from fljob.trainer.model.args import ModelArgs

_LAYER = re.compile(r"layers\.(\d+)\.(.+)")
_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
TOP_LEVEL_KEYS = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "embedding_norm.weight": "model.embed_tokens.norm.weight",  # remote code only
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
LAYER_KEYS = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "post_attn_norm.weight": "self_attn.o_proj.norm.weight",  # remote code only
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "post_ffn_norm.weight": "mlp.down_proj.norm.weight",  # remote code only
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_FROM_HF_TOP = {v: k for k, v in TOP_LEVEL_KEYS.items()}
_FROM_HF_LAYER = {v: k for k, v in LAYER_KEYS.items()}
# Buffers some HF checkpoints carry; recomputed by the model, never loaded.
_HF_IGNORED_LAYER_KEYS = {"self_attn.rotary_emb.inv_freq"}


def stock_llama_problems(args: ModelArgs) -> list[str]:
    """What a stock ``LlamaForCausalLM`` cannot compute of this model (empty: it can)."""
    problems = []
    if args.use_embedding_norm:
        problems.append("use_embedding_norm (HF Llama has no norm after the embedding)")
    if args.use_peri_norm:
        problems.append("use_peri_norm (HF Llama has no norm on the residual branches)")
    if embedding_multiplier(args) != 1.0:
        problems.append("a tied embedding with input_alpha != 1 (the multiplier cannot "
                        "be folded into a weight the output layer shares)")
    return problems


def check_hf_compatible(args: ModelArgs) -> None:
    """Raise ValueError if a plain HF Llama cannot compute this model's function."""
    problems = stock_llama_problems(args)
    if problems:
        raise ValueError("not exportable as a Hugging Face Llama: " + "; ".join(problems))


def embedding_multiplier(args: ModelArgs) -> float:
    """The input multiplier that no weight can absorb: a tied embedding's without a norm."""
    if args.tie_word_embeddings and not args.use_embedding_norm:
        return args.input_mult
    return 1.0


def fold_factors(args: ModelArgs) -> dict[str, float]:
    """Factor by which each of our keys (layer-relative inside blocks) is multiplied on
    export; keys absent are exported as they are."""
    factors = {
        "norm.weight": args.output_mult,
        "attention.wq.weight": args.attn_scale * math.sqrt(args.head_dim),
    }
    if args.use_embedding_norm:
        factors["embedding_norm.weight"] = args.input_mult
    elif not args.tie_word_embeddings:
        factors["tok_embeddings.weight"] = args.input_mult
    branch_ends = (("post_attn_norm.weight", "post_ffn_norm.weight") if args.use_peri_norm
                   else ("attention.wo.weight", "feed_forward.w2.weight"))
    factors.update(dict.fromkeys(branch_ends, args.residual_mult))
    return factors


def _scaled(value: Any, factor: float) -> Any:
    return value if factor == 1.0 else value * factor


def _relative(key: str) -> tuple[str | None, str]:
    match = _LAYER.fullmatch(key)
    return (match.group(1), match.group(2)) if match else (None, key)


def hf_key(key: str) -> str:
    """The HF name of one of our keys (KeyError for a key no HF model has)."""
    layer, rest = _relative(key)
    return TOP_LEVEL_KEYS[rest] if layer is None else f"model.layers.{layer}.{LAYER_KEYS[rest]}"


def to_hf(state_dict: dict[str, Any], args: ModelArgs) -> dict[str, Any]:
    """Our keys -> HF keys, multipliers folded in; a tied output is left to HF's tying."""
    factors = fold_factors(args)
    return {hf_key(key): _scaled(value, factors.get(_relative(key)[1], 1.0))
            for key, value in state_dict.items()
            if not (key == "output.weight" and args.tie_word_embeddings)}


def our_key(hf_name: str) -> str | None:
    """Our name of an HF key; None for buffers we recompute; KeyError for anything else."""
    match = _HF_LAYER.fullmatch(hf_name)
    if not match:
        return _FROM_HF_TOP[hf_name]
    layer, rest = match.groups()
    return None if rest in _HF_IGNORED_LAYER_KEYS else f"layers.{layer}.{_FROM_HF_LAYER[rest]}"


def from_hf(hf_state_dict: dict[str, Any], args: ModelArgs) -> dict[str, Any]:
    """HF keys -> our keys, multipliers divided out; a tied output is the embedding."""
    factors = fold_factors(args)
    state: dict[str, Any] = {}
    for name, value in hf_state_dict.items():
        key = our_key(name)
        if key is None or (key == "output.weight" and args.tie_word_embeddings):
            continue  # some tied HF checkpoints store lm_head anyway
        state[key] = _scaled(value, 1.0 / factors.get(_relative(key)[1], 1.0))
    if args.tie_word_embeddings and "tok_embeddings.weight" in state:
        state["output.weight"] = state["tok_embeddings.weight"]
    return state
