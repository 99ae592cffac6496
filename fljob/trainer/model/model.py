"""The muP Llama3 transformer: RoPE, GQA attention (SDPA), SwiGLU, RMSNorm.

Module names follow torchtitan's Llama3 (``tok_embeddings``, ``layers.<i>.attention.wq``,
``feed_forward.w1``, ``attention_norm``, ``norm``, ``output``) so its AC/compile/FSDP
helpers and FQN-based tooling apply unchanged. Every block is a named child of
``layers`` and every branch (``attention``, ``feed_forward``, norms) a named submodule,
so a forward hook on any of them reads one activation, which is what a muP coordinate
check needs.

RoPE uses the rotate-half convention of Hugging Face Llama (first half of head_dim paired
with the second half), so HF checkpoints need no q/k permutation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from fljob.trainer.model.args import ModelArgs


def rope_tables(
    head_dim: int, seq_len: int, theta: float, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables of shape (seq_len, head_dim), float32, rotate-half layout."""
    inv_freq = 1.0 / theta ** (
        torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x of shape (batch, seq, heads, head_dim) by the position tables, in float32."""
    seq_len = x.shape[1]
    cos = cos[:seq_len].view(1, seq_len, 1, -1)
    sin = sin[:seq_len].view(1, seq_len, 1, -1)
    xf = x.float()
    first, second = xf.chunk(2, dim=-1)
    rotated = torch.cat([-second, first], dim=-1)
    return (xf * cos + rotated * sin).type_as(x)


class Attention(nn.Module):
    """Causal grouped-query attention with a configurable softmax scale (muP: 1/head_dim)."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.head_dim = args.head_dim
        self.enable_gqa = args.kv_heads < args.n_heads
        self.scale = args.attn_scale
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        bs, seq_len, _ = x.shape
        # -1 heads: under tensor parallelism each rank holds only its local heads.
        q = self.wq(x).view(bs, seq_len, -1, self.head_dim)
        k = self.wk(x).view(bs, seq_len, -1, self.head_dim)
        v = self.wv(x).view(bs, seq_len, -1, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            is_causal=True, scale=self.scale, enable_gqa=self.enable_gqa,
        )
        return self.wo(out.transpose(1, 2).reshape(bs, seq_len, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    """Pre-norm block, optional peri-norms, CompleteP-scaled residual branches.

    ``x + s * PostNorm(Attn(PreNorm(x)))`` then the same with the FFN, ``s = L^-alpha``.
    """

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.residual_mult = args.residual_mult
        self.attention_norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden_dim)
        peri = args.use_peri_norm
        self.post_attn_norm = nn.RMSNorm(args.dim, eps=args.norm_eps) if peri else None
        self.post_ffn_norm = nn.RMSNorm(args.dim, eps=args.norm_eps) if peri else None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = self.attention(self.attention_norm(x), cos, sin)
        if self.post_attn_norm is not None:
            h = self.post_attn_norm(h)
        x = x + self.residual_mult * h
        h = self.feed_forward(self.ffn_norm(x))
        if self.post_ffn_norm is not None:
            h = self.post_ffn_norm(h)
        return x + self.residual_mult * h

    def init_weights(self, args: ModelArgs) -> None:
        """Hidden matrices N(0, std^2), std from each matrix's own fan-in ratio (w2 reads
        the FFN width, the others the residual stream), wq zero if asked; norm gains 1."""
        for linear in (self.attention.wq, self.attention.wk, self.attention.wv,
                       self.attention.wo, self.feed_forward.w1, self.feed_forward.w3):
            nn.init.normal_(linear.weight, mean=0.0, std=args.hidden_init_std)
        if args.zero_init_query:
            nn.init.zeros_(self.attention.wq.weight)
        nn.init.normal_(self.feed_forward.w2.weight, mean=0.0, std=args.ffn_out_init_std)
        for norm in (self.attention_norm, self.ffn_norm, self.post_attn_norm, self.post_ffn_norm):
            if norm is not None:
                norm.reset_parameters()


class MuPTransformer(nn.Module):
    """Decoder-only Llama3 with muP input/output multipliers and CompleteP depth scaling.

    Tied embeddings (``tie_word_embeddings``): ``output.weight`` *is* the
    ``tok_embeddings.weight`` Parameter from construction on. ``parallelize_mup_llama``
    keeps both modules in one FSDP unit (the root), because a Parameter shared across
    FSDP units is rejected by current torch; under TP both are sharded on the vocab
    dimension and re-tied. muP's output scaling is the logit multiplier
    ``output_alpha / m``, so the shared weight keeps the embedding's width-independent
    init and learning rate.
    """

    def __init__(self, model_args: ModelArgs) -> None:
        super().__init__()
        self.model_args = model_args
        self.input_mult = model_args.input_mult
        self.output_mult = model_args.output_mult
        self.tok_embeddings = nn.Embedding(model_args.vocab_size, model_args.dim)
        self.embedding_norm = (nn.RMSNorm(model_args.dim, eps=model_args.norm_eps)
                               if model_args.use_embedding_norm else None)
        self.layers = nn.ModuleDict(
            {str(i): TransformerBlock(model_args) for i in range(model_args.n_layers)})
        self.norm = nn.RMSNorm(model_args.dim, eps=model_args.norm_eps)
        self.output = nn.Linear(model_args.dim, model_args.vocab_size, bias=False)
        if model_args.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight
        cos, sin = self._rope_tables(device=None)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def _rope_tables(self, device: torch.device | str | None) -> tuple[torch.Tensor, torch.Tensor]:
        args = self.model_args
        return rope_tables(args.head_dim, args.max_seq_len, args.rope_theta, device=device)

    @torch.no_grad()
    def init_weights(self, buffer_device: torch.device | None = None) -> None:
        """(Re)initialise every parameter and the RoPE tables by the muP rules.

        torchtitan 0.2.2 builds the model on the meta device, parallelises it, calls
        ``to_empty`` and then this under ``torch.no_grad``; parameters may be DTensors.
        """
        args = self.model_args
        device = buffer_device or self.rope_cos.device
        self.rope_cos, self.rope_sin = self._rope_tables(device=device)
        if args.tie_word_embeddings:
            self._retie_after_to_empty()
        nn.init.normal_(self.tok_embeddings.weight, mean=0.0, std=args.emb_init_std)
        if not args.tie_word_embeddings:
            nn.init.normal_(self.output.weight, mean=0.0, std=args.init_std)
        if args.zero_init_readout:  # drawn first: a seed gives the other weights either way
            nn.init.zeros_(self.output.weight)
        for norm in (self.embedding_norm, self.norm):
            if norm is not None:
                norm.reset_parameters()
        # modules(), not layers.values(): blocks may be wrapped by AC or torch.compile.
        for module in self.modules():
            if isinstance(module, TransformerBlock):
                module.init_weights(args)

    def _retie_after_to_empty(self) -> None:
        """Restore the tie that ``to_empty`` from meta breaks on plain tensors.

        ``Module._apply`` gives each module its own new Parameter when moving a meta
        tensor to a real device. DTensor (FSDP/TP) parameters are swapped in place and
        stay shared; re-assigning one there would bypass the wrapper, so a broken tie
        on a DTensor is an error rather than something to patch.
        """
        embedding, output = self.tok_embeddings.weight, self.output.weight
        if output is embedding:
            return
        sharded = isinstance(embedding, DTensor) or isinstance(output, DTensor)
        if sharded:
            raise RuntimeError("tied output/embedding DTensor parameters are not shared; "
                               "tie them before sharding (see parallelize_mup_llama)")
        self.output.weight = embedding

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits of shape (batch, seq, vocab) for token ids of shape (batch, seq)."""
        h = self.tok_embeddings(tokens)
        if self.embedding_norm is not None:
            h = self.embedding_norm(h)
        if self.input_mult != 1.0:  # the default; outside the compiled blocks a x1 is a pass
            h = h * self.input_mult
        for block in self.layers.values():
            h = block(h, self.rope_cos, self.rope_sin)
        # The logit multiplier is applied before the (linear) projection: the same
        # function, on a (batch, seq, dim) tensor instead of (batch, seq, vocab).
        return self.output(self.norm(h) * self.output_mult)
