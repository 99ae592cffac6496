"""Model arguments of the muP Llama3: shape, norms, tying and the muP/CompleteP knobs.

This module imports neither torch nor torchtitan, so the job spec can validate a flavor
(and read its parameter count) without paying for a torch import. The trainer duck-types
it as torchtitan 0.2.2's ``BaseModelArgs`` (``update_from_config`` and
``get_nparams_and_flops``); see ``MUP.md`` for the parametrisation itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from torch import nn

AttentionScaling = Literal["mup", "standard"]


@dataclass
class ModelArgs:
    """Shape and parametrisation of one model.

    Derived quantities (head_dim, FFN width, width and depth multipliers, every muP
    multiplier) are properties, so nothing is typed twice and a ``dataclasses.replace``
    (say of ``vocab_size`` from the tokenizer) keeps them consistent.
    """

    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    # None means plain multi-head attention (n_kv_heads == n_heads).
    n_kv_heads: int | None = None
    vocab_size: int = 8192
    # SwiGLU hidden width = ffn_ratio * dim rounded up to ffn_multiple_of. 8/3 gives the
    # three SwiGLU matrices the parameters of a two-matrix MLP of width 4*dim. (The
    # original stacked a 4.0 multiplier on top of the 2/3 rule: 2816 for dim 256.)
    ffn_ratio: float = 8 / 3
    ffn_multiple_of: int = 256
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    use_embedding_norm: bool = False
    use_peri_norm: bool = False
    tie_word_embeddings: bool = False

    # muP / CompleteP. With mup_enabled False the same code is the standard
    # parametrisation (SP): no multipliers, width-independent init and learning rates.
    mup_enabled: bool = True
    base_dim: int = 256
    base_depth: int = 4
    input_alpha: float = 1.0
    output_alpha: float = 1.0
    attn_scaling: AttentionScaling = "standard"
    depth_scaling: bool = True
    depth_alpha: float = 1.0
    init_std: float = 0.02
    emb_init_std: float = 0.02
    zero_init_readout: bool = False
    zero_init_query: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError for shapes the model cannot build or muP cannot scale."""
        positive = ("dim", "n_layers", "n_heads", "vocab_size", "ffn_multiple_of",
                    "max_seq_len", "base_dim", "base_depth")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for RoPE")
        if self.kv_heads <= 0 or self.n_heads % self.kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads "
                             f"{self.n_kv_heads}")
        if self.ffn_ratio <= 0:
            raise ValueError(f"ffn_ratio must be positive, got {self.ffn_ratio}")
        if self.attn_scaling not in ("mup", "standard"):
            raise ValueError(f"attn_scaling must be 'mup' or 'standard', "
                             f"got {self.attn_scaling!r}")
        if not 0.0 <= self.depth_alpha <= 1.0:
            raise ValueError(f"depth_alpha must lie in [0, 1], got {self.depth_alpha}")
        if self.init_std <= 0 or self.emb_init_std <= 0:
            raise ValueError("init_std and emb_init_std must be positive")
        if self.zero_init_readout and self.tie_word_embeddings:
            raise ValueError("zero_init_readout needs untied embeddings (a tied readout is the input)")

    # ---- shape -------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def ffn_hidden_dim(self) -> int:
        return self._ffn_width(self.dim)

    @property
    def base_ffn_hidden_dim(self) -> int:
        """The FFN width of the base shape: the same rule applied at ``base_dim``."""
        return self._ffn_width(self.base_dim)

    def _ffn_width(self, dim: int) -> int:
        # round() first: 8/3 * 768 is 2047.9999999999998 in floating point.
        raw = round(self.ffn_ratio * dim, 6)
        return self.ffn_multiple_of * math.ceil(raw / self.ffn_multiple_of)

    # ---- width and depth ratios against the base shape ---------------------------------
    # muP scales every hidden matrix by the ratio of its own fan-in to the base shape's
    # (microsoft/mup's base shapes). wq wk wv w1 w3 read the residual stream (fan-in dim),
    # and so does wo (n_heads * head_dim == dim); w2 reads the FFN hidden layer, whose
    # width is rounded up to ffn_multiple_of and so does not grow exactly like dim.
    @property
    def width_mult(self) -> float:
        """m = dim / base_dim: how much wider than the tuned base model this one is; the
        fan-in ratio of every hidden matrix but w2."""
        return self.dim / self.base_dim

    @property
    def ffn_width_mult(self) -> float:
        """m_ffn = ffn_hidden_dim / base_ffn_hidden_dim: the fan-in ratio of w2."""
        return self.ffn_hidden_dim / self.base_ffn_hidden_dim

    @property
    def depth_mult(self) -> float:
        """L = n_layers / base_depth: how much deeper than the base model."""
        return self.n_layers / self.base_depth

    # ---- muP multipliers (all 1 when mup_enabled is False) -----------------------------
    @property
    def _depth_scaled(self) -> bool:
        return self.mup_enabled and self.depth_scaling

    @property
    def residual_mult(self) -> float:
        """CompleteP branch multiplier L^-alpha on every residual branch."""
        return self.depth_mult ** -self.depth_alpha if self._depth_scaled else 1.0

    @property
    def hidden_lr_depth_factor(self) -> float:
        """CompleteP L^(alpha-1) on the learning rate of every parameter inside a block."""
        return self.depth_mult ** (self.depth_alpha - 1.0) if self._depth_scaled else 1.0

    @property
    def input_mult(self) -> float:
        return self.input_alpha if self.mup_enabled else 1.0

    @property
    def output_mult(self) -> float:
        """Logit multiplier alpha_out / m: muP's output scaling lives here, not in init."""
        return self.output_alpha / self.width_mult if self.mup_enabled else 1.0

    @property
    def hidden_init_std(self) -> float:
        """Std of the hidden matrices that read the residual stream (wq wk wv wo w1 w3):
        init_std / sqrt(m) under muP (fan-in scaling)."""
        return self._fan_in_init_std(self.width_mult)

    @property
    def ffn_out_init_std(self) -> float:
        """Std of w2, whose fan-in is the FFN width: init_std / sqrt(m_ffn) under muP."""
        return self._fan_in_init_std(self.ffn_width_mult)

    def _fan_in_init_std(self, fan_in_mult: float) -> float:
        return self.init_std / math.sqrt(fan_in_mult) if self.mup_enabled else self.init_std

    @property
    def attn_scale(self) -> float:
        """Softmax temperature: 1/head_dim for muP attention, else 1/sqrt(head_dim)."""
        if self.mup_enabled and self.attn_scaling == "mup":
            return 1.0 / self.head_dim
        return 1.0 / math.sqrt(self.head_dim)

    # ---- size and cost -----------------------------------------------------------------
    @property
    def block_matrix_params(self) -> int:
        """Parameters of the seven matrices of one block."""
        q_and_o = 2 * self.dim * self.n_heads * self.head_dim
        k_and_v = 2 * self.dim * self.kv_heads * self.head_dim
        return q_and_o + k_and_v + 3 * self.dim * self.ffn_hidden_dim

    def num_params(self) -> int:
        """Trainable parameters of the model, a tied embedding counted once."""
        norms_per_block = (4 if self.use_peri_norm else 2) * self.dim
        blocks = self.n_layers * (self.block_matrix_params + norms_per_block)
        embedding = self.vocab_size * self.dim
        output = 0 if self.tie_word_embeddings else self.vocab_size * self.dim
        root_norms = (2 if self.use_embedding_norm else 1) * self.dim
        return blocks + embedding + output + root_norms

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token: 6 per matmul weight (forward + backward) + attention.

        The output projection is a matmul whether or not its weight is tied, and the
        embedding lookup is not one; norm gains are negligible. The attention term counts
        QK^T and AV over the full (non-causal) square, as torchtitan does for MFU.
        """
        matmul_params = self.n_layers * self.block_matrix_params + self.vocab_size * self.dim
        attention = 12 * self.n_layers * self.n_heads * self.head_dim * seq_len
        return 6 * matmul_params + attention

    # ---- torchtitan 0.2.2 BaseModelArgs protocol --------------------------------------
    def update_from_config(self, job_config: Any, **kwargs: Any) -> None:
        """Size RoPE tables for the job's sequence length; reject what this model lacks."""
        parallelism = job_config.parallelism
        if parallelism.context_parallel_degree > 1:
            raise NotImplementedError("context parallelism is not supported by the muP Llama")
        if parallelism.pipeline_parallel_degree > 1:
            raise NotImplementedError("pipeline parallelism is not supported by the muP Llama")
        self.max_seq_len = job_config.training.seq_len

    def get_nparams_and_flops(self, model: nn.Module | None, seq_len: int) -> tuple[int, int]:
        """(parameter count, training FLOPs per token) for torchtitan's MFU logging.

        The count is the model's own (shared tensors once) when a model is given, so
        model converters are reflected; otherwise the analytic ``num_params``.
        """
        nparams = self.num_params() if model is None else sum(
            p.numel() for p in model.parameters())
        return nparams, self.flops_per_token(seq_len)
