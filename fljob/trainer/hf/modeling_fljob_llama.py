"""fljob's muP Llama for Hugging Face ``transformers`` (remote code of ``fljob export hf``).

``fljob export hf`` copies this file into the export and points ``config.json``'s
``auto_map`` at it, so ``AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)``
builds this model. It is a stock ``LlamaForCausalLM`` with the few modules fljob's model
has and Llama lacks, attached where Llama's own forward calls them (so it follows
``transformers``' Llama code, its caches and generation, across versions):

- ``embedding_norm``: an RMSNorm after the embedding (``model.embed_tokens.norm``);
- ``peri_norm``: an RMSNorm after each branch's last linear (``self_attn.o_proj.norm``,
  ``mlp.down_proj.norm``);
- ``embedding_multiplier``: the input multiplier of a tied embedding without a norm, the one
  muP multiplier that no weight can absorb. Every other multiplier is folded into the
  weights (see fljob's ``fljob/trainer/hf/folding.py``).

Standalone: imports only torch and transformers.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.llama.configuration_llama import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaForCausalLM, LlamaRMSNorm


class FljobLlamaConfig(LlamaConfig):
    """A Llama config with fljob's three extra settings (read with Llama-like defaults)."""

    model_type = "fljob_llama"


class NormedEmbedding(nn.Embedding):
    """Embedding, then an optional RMSNorm, then an optional constant multiplier."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__(config.vocab_size, config.hidden_size)
        normed = getattr(config, "embedding_norm", False)
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps) if normed else None
        self.multiplier = float(getattr(config, "embedding_multiplier", 1.0))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = super().forward(input_ids)
        if self.norm is not None:
            hidden = self.norm(hidden)
        return hidden * self.multiplier if self.multiplier != 1.0 else hidden


class NormedLinear(nn.Linear):
    """A bias-free linear layer whose output goes through an RMSNorm (a peri-norm)."""

    def __init__(self, in_features: int, out_features: int, eps: float) -> None:
        super().__init__(in_features, out_features, bias=False)
        self.norm = LlamaRMSNorm(out_features, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(super().forward(x))


class FljobLlamaForCausalLM(LlamaForCausalLM):
    """``LlamaForCausalLM`` with fljob's embedding norm, peri-norms and embedding multiplier."""

    config_class = FljobLlamaConfig

    def __init__(self, config: FljobLlamaConfig) -> None:
        super().__init__(config)
        model, eps = self.model, config.rms_norm_eps
        if getattr(config, "embedding_norm", False) or \
                float(getattr(config, "embedding_multiplier", 1.0)) != 1.0:
            model.embed_tokens = NormedEmbedding(config)
        if getattr(config, "peri_norm", False):
            for layer in model.layers:
                attention, mlp = layer.self_attn, layer.mlp
                attention.o_proj = NormedLinear(attention.o_proj.in_features,
                                                attention.o_proj.out_features, eps)
                mlp.down_proj = NormedLinear(mlp.down_proj.in_features,
                                             mlp.down_proj.out_features, eps)
        self.post_init()  # again: re-tie lm_head to the new embedding, record the new modules
