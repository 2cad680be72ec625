"""A decoder-only GPT, readable in one sitting.

Every part is selectable by `ModelConfig`: LayerNorm or RMSNorm, Pre-LN or Post-LN, a standard
or gated (SwiGLU/GeGLU) MLP, learned or rotary positions, SDPA or explicit attention, grouped-query
heads, optional cross-attention, tied or untied LM head, and the switches of modded-nanogpt's and
nanochat's recipe: ReLU², QK-norm, zero-initialised output projections, logit soft-capping.
Parameter names follow GPT-2 / nanoGPT (`wte`, `wpe`, `h`, `ln_1`, `attn.c_attn`, `mlp.c_fc`,
`ln_f`, `lm_head`): weights map key for key.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from functools import cache, partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
from torch.utils.checkpoint import checkpoint

from gpt.config import ModelConfig
from gpt.errors import GPTError
from gpt.kvcache import Group, KVCache


def relu_squared(x: Tensor) -> Tensor:
    """relu(x)^2, Primer's activation (faster to train than GELU in its search), which
    modded-nanogpt and nanochat use: as cheap as ReLU, smooth where it is positive."""
    return F.relu(x).square()


ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu,
    "gelu_tanh": partial(F.gelu, approximate="tanh"),
    "relu": F.relu,
    "relu2": relu_squared,
    "leaky_relu": F.leaky_relu,
    "silu": F.silu,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
}
GATED_ACTIVATION = {"swiglu": "silu", "geglu": "gelu"}


def rms_norm(x: Tensor, eps: float) -> Tensor:
    """x / sqrt(mean(x^2) + eps) over the last dimension, the statistics in float32 even under
    autocast; the result in x's dtype."""
    x_float = x.float()
    return (x_float * torch.rsqrt(x_float.pow(2).mean(-1, keepdim=True) + eps)).type_as(x)


class RMSNorm(nn.Module):
    """Root-mean-square norm: x / sqrt(mean(x^2) + eps) * weight; no centring, no bias."""

    def __init__(self, ndim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.eps) * self.weight


def make_norm(config: ModelConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.n_embd, config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)


def rope_cache(seq_len: int, head_dim: int, base: float) -> tuple[Tensor, Tensor]:
    """cos and sin tables of rotary embeddings, each (seq_len, head_dim // 2)."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)  # (T, hs/2)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the pairs (x[..., i], x[..., i + hs/2]) of x (B, nh, T, hs) by per-position angles."""
    x1, x2 = x.float().chunk(2, dim=-1)  # (B, nh, T, hs/2) each
    rotated = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return rotated.type_as(x)


def soft_cap(logits: Tensor, cap: float) -> Tensor:
    """cap * tanh(logits / cap), in float32: logits near 0 pass unchanged, large ones saturate
    below cap, so no logit can run away (Gemma 2, modded-nanogpt)."""
    return cap * torch.tanh(logits.float() / cap)


def document_ids(idx: Tensor, eot_id: int) -> Tensor:
    """Each token's document in its row (B, T): an end-of-text token begins the document it
    introduces, as sampling from an empty prompt begins with it; tokens before a row's first
    one are document 0 (the end of a document the row starts inside)."""
    return (idx == eot_id).cumsum(dim=1)


@torch.compiler.disable  # built once per forward, outside any compiled graph
def document_mask(idx: Tensor, eot_id: int, flex: bool) -> Tensor | BlockMask:
    """Causal attention within each document of idx (B, T): FlexAttention's block mask (which
    skips the blocks no query sees), or a dense one (B, 1, T, T), True = visible."""
    docs = document_ids(idx, eot_id)  # (B, T)
    B, T = idx.shape
    if not flex:
        causal = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()  # (T, T)
        return (causal & (docs[:, :, None] == docs[:, None, :]))[:, None]  # (B, 1, T, T)

    def same_document(b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        return (q >= k) & (docs[b, q] == docs[b, k])

    return create_block_mask(same_document, B, None, T, T, device=idx.device)


@cache
def compiled_flex_attention() -> Callable[..., Tensor]:
    """flex_attention compiled once: its eager form is a slow reference, and runs no backward
    on the CPU."""
    return torch.compile(flex_attention)


def flex_attend(q: Tensor, k: Tensor, v: Tensor, mask: BlockMask) -> Tensor:
    """FlexAttention of q, k, v (B, nh, T, hs) under `mask`: inside a compiled model part of
    its graph; else compiled on its own on a GPU, eager elsewhere (forward only: the CPU has
    no FlexAttention backward)."""
    if torch.compiler.is_compiling() or not q.is_cuda:
        return flex_attention(q, k, v, block_mask=mask)  # type: ignore[return-value]
    return compiled_flex_attention()(q, k, v, block_mask=mask)


def head_loss(x: Tensor, targets: Tensor, head: nn.Module, cap: float | None) -> Tensor:
    """The summed cross-entropy of the LM head over rows x (N, C) against targets (N,), those
    of -1 left out; the logits soft-capped as the model's forward caps them."""
    logits = head(x)  # (N, vocab)
    if cap is not None:
        logits = soft_cap(logits, cap)
    return F.cross_entropy(logits.float(), targets, ignore_index=-1, reduction="sum")


def chunked_cross_entropy(
    x: Tensor, targets: Tensor, head: nn.Module, cap: float | None, chunk: int
) -> Tensor:
    """The mean cross-entropy of `head` over x (B, T, C) against targets (B, T), `chunk` rows
    at a time: each chunk's logits live only while it is computed, and the backward pass
    computes them again, so the (B * T, vocab) logits are never whole in memory."""
    x, targets = x.reshape(-1, x.size(-1)), targets.reshape(-1)  # (N, C), (N,)
    total = torch.zeros((), dtype=torch.float32, device=x.device)
    for rows, wanted in zip(x.split(chunk), targets.split(chunk), strict=True):
        if torch.is_grad_enabled():
            total = total + checkpoint(head_loss, rows, wanted, head, cap, use_reentrant=False)
        else:
            total = total + head_loss(rows, wanted, head, cap)
    return total / (targets != -1).sum()  # as F.cross_entropy's mean (0/0: NaN)


class Attention(nn.Module):
    """Multi-head attention with a fused QKV projection and optional grouped key/value heads.

    Self-attention (context is None): queries, keys and values come from x, with a causal mask.
    Cross-attention: queries from x, keys and values from `context`, no mask. Both use the same
    fused weight: its first n_embd rows project queries, the rest keys and values. With qk_norm,
    every head's queries and keys are RMS-normalised (no gain) before RoPE, as in modded-nanogpt:
    attention logits stay bounded by sqrt(head_dim), which keeps them from growing unchecked.
    """

    def __init__(self, config: ModelConfig, causal: bool = True) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.kv_heads, config.head_dim
        self.q_dim = self.n_head * self.head_dim
        self.kv_dim = self.n_kv_head * self.head_dim
        self.c_attn = nn.Linear(config.n_embd, self.q_dim + 2 * self.kv_dim, bias=config.bias)
        self.c_proj = nn.Linear(self.q_dim, config.n_embd, bias=config.bias)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.dropout = config.dropout
        self.causal = causal
        self.manual = config.attention == "manual"
        self.rope = config.pos_embedding == "rope" and causal
        self.qk_norm_eps = config.norm_eps if config.qk_norm else None
        self.block_size = config.block_size
        if self.manual and causal:
            self.register_buffer("mask", None, persistent=False)
            self.init_buffers()

    def init_buffers(self) -> None:
        """The causal mask of manual attention (not saved: computed where the model is)."""
        if self.manual and self.causal:
            T = self.block_size
            self.mask = torch.ones(T, T, dtype=torch.bool).tril().to(self.c_attn.weight.device)

    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        rope: tuple[Tensor, Tensor] | None = None,
        cache: KVCache | None = None,
        layer: int = 0,
        mask: Tensor | BlockMask | None = None,
    ) -> Tensor:
        """Attention of x (B, T, C); with `cache`, x (1, N, C) holds the new tokens of the
        cache's pass and attends over each row's cached keys too (incremental decoding). A
        `mask` (document_mask's) replaces the causal one of self-attention."""
        if cache is not None:
            return self.resid_dropout(self.c_proj(self._attend_cached(x, cache, layer)))
        B, T, _ = x.shape  # batch, sequence length, n_embd
        if context is None:
            q, k, v = self.c_attn(x).split([self.q_dim, self.kv_dim, self.kv_dim], dim=-1)
        else:
            w_q, w_kv = self.c_attn.weight.split([self.q_dim, 2 * self.kv_dim], dim=0)
            b_q, b_kv = (None, None) if self.c_attn.bias is None else self.c_attn.bias.split(
                [self.q_dim, 2 * self.kv_dim]
            )
            q = F.linear(x, w_q, b_q)
            k, v = F.linear(context, w_kv, b_kv).split([self.kv_dim, self.kv_dim], dim=-1)
        S = k.size(1)  # key length: T for self-attention, the context's length for cross
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, S, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, S, hs)
        v = v.view(B, S, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, S, hs)
        q, k = self._normalise_and_rotate(q, k, rope)
        k, v = self._repeat_kv(k, v)
        if isinstance(mask, BlockMask):
            y = flex_attend(q, k, v, mask)
        elif self.manual:
            if mask is None and self.causal:
                mask = self.mask[:T, :S]
            y = self._manual_attention(q, k, v, mask)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
                is_causal=self.causal and mask is None,
            )
        y = y.transpose(1, 2).contiguous().view(B, T, self.q_dim)  # (B, T, nh*hs)
        return self.resid_dropout(self.c_proj(y))

    def _attend_cached(self, x: Tensor, cache: KVCache, layer: int) -> Tensor:
        """Each group of the pass: its queries against its rows' keys, old and new (1, N, nh*hs)."""
        q, k, v = self.c_attn(x).split([self.q_dim, self.kv_dim, self.kv_dim], dim=-1)
        outputs = []
        for group in cache.groups:
            b, T = group.size, group.T
            span = slice(group.offset, group.offset + b * T)
            qg = q[0, span].view(b, T, self.n_head, self.head_dim).transpose(1, 2)  # (b, nh, T, hs)
            kg = k[0, span].view(b, T, self.n_kv_head, self.head_dim).transpose(1, 2)
            vg = v[0, span].view(b, T, self.n_kv_head, self.head_dim).transpose(1, 2)
            qg, kg = self._normalise_and_rotate(qg, kg, group.rope)
            kg, vg = cache.update(layer, group, kg, vg)  # (b, nkv, S, hs) in the cache's dtype
            qg = qg.to(kg.dtype)  # a float32 cache under bfloat16 weights: attention in float32
            kg, vg = self._repeat_kv(kg, vg)
            y = self._attend_group(qg, kg, vg, group)  # (b, nh, T, hs)
            outputs.append(y.transpose(1, 2).reshape(1, b * T, self.q_dim))
        y = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)
        return y.to(x.dtype)

    def _attend_group(self, q: Tensor, k: Tensor, v: Tensor, group: Group) -> Tensor:
        """Attention of one group: a mask where rows or positions differ, else plain causal
        (fresh rows) or unmasked (one new token each, which sees every cached key)."""
        if self.manual:
            T, S = q.size(-2), k.size(-2)
            mask = self.mask[:T, :S] if group.causal else group.mask
            return self._manual_attention(q, k, v, mask)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=group.mask, is_causal=group.causal)

    def _normalise_and_rotate(
        self, q: Tensor, k: Tensor, rope: tuple[Tensor, Tensor] | None
    ) -> tuple[Tensor, Tensor]:
        """QK-norm (each head's q and k to unit RMS), then rotary positions, where enabled."""
        if self.qk_norm_eps is not None:
            q, k = rms_norm(q, self.qk_norm_eps), rms_norm(k, self.qk_norm_eps)
        if self.rope and rope is not None:
            cos, sin = rope
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return q, k

    def _repeat_kv(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Grouped-query: each kv head serves n_head / n_kv_head query heads (B, nh, S, hs)."""
        if self.n_kv_head == self.n_head:
            return k, v
        repeats = self.n_head // self.n_kv_head
        return k.repeat_interleave(repeats, dim=1), v.repeat_interleave(repeats, dim=1)

    def _manual_attention(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        """softmax(QK^T / sqrt(hs) + mask) V, written out; mask True = visible."""
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))  # (B, nh, T, S)
        if mask is not None:
            att = att.masked_fill(~mask, float("-inf"))
        att = self.attn_dropout(F.softmax(att, dim=-1))
        return att @ v  # (B, nh, T, hs)


class MLP(nn.Module):
    """Standard `W2 act(W1 x)` or gated `W2 (act(W1 x) * W3 x)` (SwiGLU: silu, GeGLU: gelu)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        hidden = config.hidden_dim
        self.gated = config.mlp != "standard"
        name = GATED_ACTIVATION[config.mlp] if self.gated else config.activation
        self.act = ACTIVATIONS[name]
        self.c_fc = nn.Linear(config.n_embd, hidden, bias=config.bias)  # W1
        self.c_up = nn.Linear(config.n_embd, hidden, bias=config.bias) if self.gated else None  # W3
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)  # W2
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        h = self.act(self.c_fc(x))  # (B, T, hidden)
        if self.c_up is not None:
            h = h * self.c_up(x)
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    """One transformer block: attention, [cross-attention,] MLP, each inside a residual."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.pre_norm = config.norm_position == "pre"
        self.ln_1 = make_norm(config)
        self.attn = Attention(config, causal=True)
        if config.cross_attention:
            self.ln_cross = make_norm(config)
            self.cross_attn = Attention(config, causal=False)
        else:
            self.cross_attn = None
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config)

    def _residual(self, x: Tensor, norm: nn.Module, f: Callable[[Tensor], Tensor]) -> Tensor:
        """Pre-LN: x + f(norm(x)). Post-LN: norm(x + f(x))."""
        return x + f(norm(x)) if self.pre_norm else norm(x + f(x))

    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        rope: tuple[Tensor, Tensor] | None = None,
        cache: KVCache | None = None,
        layer: int = 0,
        mask: Tensor | BlockMask | None = None,
    ) -> Tensor:
        def attend(h: Tensor) -> Tensor:
            return self.attn(h, rope=rope, cache=cache, layer=layer, mask=mask)

        x = self._residual(x, self.ln_1, attend)
        if self.cross_attn is not None:
            x = self._residual(x, self.ln_cross, lambda h: self._cross(h, context))
        return self._residual(x, self.ln_2, self.mlp)

    def _cross(self, h: Tensor, context: Tensor | None) -> Tensor:
        """Cross-attention of h to context (B, S, C); a cached pass's tokens (1, B*T, C) are
        viewed as the B rows they belong to."""
        assert self.cross_attn is not None and context is not None
        return self.cross_attn(h.view(context.size(0), -1, h.size(-1)), context=context).view_as(h)


class GPT(nn.Module):
    """The language model: embeddings, `n_layer` blocks, a final norm (Pre-LN) and the LM head."""

    # set by the trainer ([train] loss_chunk, document_masking): ways of running, not weights
    loss_chunk: int | None = None  # tokens per chunk of the LM head and loss; None = all at once
    document_eot: int | None = None  # the end-of-text id that splits documents; None = causal

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.padded_vocab_size is None:
            raise GPTError(
                "[model] vocab_size is unset; set it, or let gpt train take it from the tokenizer"
            )
        self.config = config
        # set by the trainer ([train] activation_checkpointing): a way of running, not a weight
        self.activation_checkpointing = False
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.padded_vocab_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            )
        )
        if config.pos_embedding == "learned":
            self.transformer["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        else:
            self.register_buffer("rope_cos", None, persistent=False)
            self.register_buffer("rope_sin", None, persistent=False)
        if config.norm_position == "pre":
            self.transformer["ln_f"] = make_norm(config)
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight  # one Parameter, not a copy
        self.init_buffers()
        self.init_weights()

    def init_buffers(self) -> None:
        """The buffers that are not saved (rotary tables, manual attention's mask), computed
        on the CPU and placed where the weights are: after a model built on the meta device
        is materialised (`to_empty`), they are computed again."""
        device = self.transformer.wte.weight.device
        if "wpe" not in self.transformer:
            cos, sin = rope_cache(self.config.block_size, self.config.head_dim,
                                  self.config.rope_base)  # (T, hs/2) each
            self.rope_cos, self.rope_sin = cos.to(device), sin.to(device)
        for module in self.modules():
            if isinstance(module, Attention):
                module.init_buffers()

    def init_weights(self) -> None:
        """Draw every weight (`init_steps`), in place."""
        with torch.no_grad():
            for name, init in self.init_steps():
                init(self.get_parameter(name))

    def init_steps(self) -> Iterator[tuple[str, Callable[[Tensor], Tensor]]]:
        """The initialisation, as (parameter name, in-place init) in the order the steps draw
        from the global RNG; a sharded model draws each whole, in this order, and keeps its rows.

        The layers' constructors drew their own defaults before these steps (nn.Linear's
        and nn.Embedding's `reset_parameters`): the steps overwrite them, but they moved the
        RNG, so a model built on the meta device replays them first (`draw_as_constructed`).

        GPT-2's scheme: every Linear and Embedding weight ~ N(0, 0.02), biases zero, norm
        weights one (a tied head is drawn twice, as the embedding then as the head: the head's
        draw stays). Then the projections that write into the residual stream (attention,
        cross-attention and MLP `c_proj`) again: N(0, 0.02 / sqrt(2 * n_layer)) so that the
        stream's variance does not grow with depth, or zero with `zero_init_proj`
        (modded-nanogpt, nanochat) so that every block starts as the identity and each
        sublayer's output grows from nothing.
        """
        normal = partial(nn.init.normal_, mean=0.0, std=0.02)
        for prefix, module in self.named_modules(prefix="", remove_duplicate=False):
            at = f"{prefix}." if prefix else ""
            if isinstance(module, (nn.Linear, nn.Embedding)):
                yield f"{at}weight", normal
            elif isinstance(module, (nn.LayerNorm, RMSNorm)):
                yield f"{at}weight", nn.init.ones_
            if isinstance(module, (nn.Linear, nn.LayerNorm)) and module.bias is not None:
                yield f"{at}bias", nn.init.zeros_
        std = 0.02 / math.sqrt(2 * self.config.n_layer)
        projection = nn.init.zeros_ if self.config.zero_init_proj else partial(
            nn.init.normal_, mean=0.0, std=std)
        for name, _ in self.named_parameters():
            if name.endswith("c_proj.weight"):
                yield name, projection

    @staticmethod
    def draw_as_constructed(config: ModelConfig) -> None:
        """Draw from the global RNG what GPT(config)'s layer constructors draw, one layer at a
        time on the CPU, and drop it: a model built on the meta device draws nothing, so this
        puts its `init_steps` on the stream they take in GPT(config)."""
        with torch.device("meta"):
            twin = GPT(config)
        for module in twin.modules():  # the order they are constructed in
            shapes = {name: p.shape for name, p in module.named_parameters(recurse=False)}
            if shapes and hasattr(module, "reset_parameters"):
                for name, shape in shapes.items():  # plain CPU tensors, freed after the draw
                    setattr(module, name, nn.Parameter(torch.empty(shape), requires_grad=False))
                module.reset_parameters()
                for name in shapes:
                    setattr(module, name, None)

    def forward(
        self,
        idx: Tensor,
        targets: Tensor | None = None,
        context: Tensor | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
    ) -> tuple[Tensor | None, Tensor | None]:
        """Logits (B, T, vocab) for every position of idx (B, T); loss if targets are given.

        The loss is the mean cross-entropy over targets that are not -1; with `loss_chunk` set
        it is computed chunk by chunk and the logits are not returned (None). With
        `document_eot` set, a token attends only within its document (`document_mask`).
        `context` (B, S, n_embd) feeds the cross-attention sublayers of a model built with
        `cross_attention = true`.
        With `cache` (from `new_cache`), idx holds only new tokens: row i's continue where row i
        of the cache ends, and earlier keys and values come from the cache (incremental
        decoding; see gpt/kvcache.py for passes that feed rows unequal numbers of tokens).
        `last_only` computes the LM head for each row's last token only (B, 1, vocab): all
        sampling needs. With `logit_softcap` set, the logits (training's and sampling's alike)
        are soft-capped.
        """
        B, T = idx.shape
        if cache is None and T > self.config.block_size:
            raise GPTError(
                f"sequence of {T} tokens is longer than block_size = {self.config.block_size}"
            )
        if self.config.cross_attention and context is None:
            raise GPTError("this model has cross-attention blocks; pass context=(B, S, n_embd)")
        groups = None
        if cache is not None:
            groups = cache.begin((B, T))
            idx = idx.reshape(1, -1)  # (1, N) the groups' tokens one after another
        x = self.transformer.wte(idx)  # (B, T, C)
        rope = None
        if groups is not None:
            x = self._place_cached(x, groups)
        elif "wpe" in self.transformer:
            x = x + self.transformer.wpe(torch.arange(T, device=idx.device))  # (T, C) broadcast
        else:
            rope = (self.rope_cos[:T], self.rope_sin[:T])  # (T, hs/2)
        x = self.transformer.drop(x)
        mask = None
        if self.document_eot is not None and cache is None:
            mask = document_mask(idx, self.document_eot, flex=idx.is_cuda)
        recompute = (self.activation_checkpointing and self.training and torch.is_grad_enabled()
                     and cache is None)
        for i, block in enumerate(self.transformer.h):
            if recompute:
                # keep only the block's input; the backward pass runs the block again, with the
                # same dropout masks (the RNG state is saved and replayed)
                x = checkpoint(block, x, context=context, rope=rope, mask=mask,
                               use_reentrant=False)
                continue
            x = block(x, context=context, rope=rope, cache=cache, layer=i, mask=mask)
        if cache is not None:
            cache.advance()
        if "ln_f" in self.transformer:
            x = self.transformer.ln_f(x)
        if groups is not None and last_only:
            last = [g.offset + i * g.T + n - 1 for g in groups for i, n in enumerate(g.fed)]
            x = x[0, last][:, None]  # (rows, 1, C): each row's last real token
        elif last_only:
            x = x[:, -1:]  # (B, 1, C): the head is the largest matmul; skip unused positions
        elif groups is not None and len(groups) == 1:
            x = x.view(groups[0].size, groups[0].T, -1)  # (b, T, C)
        elif targets is not None and self.loss_chunk is not None:
            cap = self.config.logit_softcap
            return None, chunked_cross_entropy(x, targets, self.lm_head, cap, self.loss_chunk)
        logits = self.lm_head(x)  # (B, T, vocab)
        if self.config.logit_softcap is not None:
            logits = soft_cap(logits, self.config.logit_softcap)  # (B, T, vocab) float32
        loss = None
        if targets is not None:
            loss = F.cross_entropy(
                logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1
            )
        return logits, loss

    def _place_cached(self, x: Tensor, groups: list[Group]) -> Tensor:
        """Positions of a cached pass's tokens x (1, N, C): learned ones added, or each group's
        rotary angles set for its attention."""
        if "wpe" in self.transformer:
            positions = [g.positions.expand(g.size, g.T).reshape(-1) for g in groups]
            return x + self.transformer.wpe(torch.cat(positions))  # (N, C) broadcast
        for g in groups:  # (T, hs/2) shared by lockstep rows, else (b, 1, T, hs/2)
            cos, sin = self.rope_cos[g.positions], self.rope_sin[g.positions]
            g.rope = (cos, sin) if g.positions.dim() == 1 else (cos[:, None], sin[:, None])
        return x

    def new_cache(
        self, batch: int, max_len: int | None = None, dtype: torch.dtype | None = None
    ) -> KVCache:
        """An empty KV cache for `batch` sequences of up to `max_len` positions (block_size).

        `dtype` defaults to the weights'; attention then runs in the cache's dtype (float32
        keys and values under bfloat16 weights: CPU attention kernels are far faster in float32).
        """
        cfg = self.config
        max_len = max_len or cfg.block_size
        if max_len > cfg.block_size:
            raise GPTError(f"a cache of {max_len} positions is longer than block_size = "
                           f"{cfg.block_size}")
        weight = self.transformer.wte.weight
        return KVCache(cfg.n_layer, batch, cfg.kv_heads, max_len, cfg.head_dim, weight.device,
                       dtype or weight.dtype)

    def replace_linears(self, make: Callable[[nn.Linear], nn.Module]) -> None:
        """Swap, in place, every Linear layer (the LM head included) for `make(linear)`, an
        inference-only layer such as a packed or an int8 one. Cross-attention keeps its Linear:
        it splits the fused weight at run time."""
        for name, module in list(self.named_modules()):
            if name.endswith("cross_attn"):
                continue
            for child_name, child in list(module.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(module, child_name, make(child))

    def load_weights(self, state: Mapping[str, Tensor]) -> tuple[list[str], list[str]]:
        """Copy `state` in, where a tied head may be left out (checkpoints store it once, as the
        token embedding); return the keys it lacks and those the model does not have."""
        with torch.no_grad():
            missing, unexpected = self.load_state_dict(state, strict=False)
        if self.config.tie_embeddings:
            missing = [k for k in missing if k != "lm_head.weight"]
        return missing, unexpected

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameters, each shared Parameter counted once; optionally without the embedding tables.

        Excluding embeddings removes the token and position tables (and so a head tied to the
        token table); an untied LM head is a separate matmul and stays counted.
        """
        total = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            total -= self.transformer.wte.weight.numel()
            if "wpe" in self.transformer:
                total -= self.transformer.wpe.weight.numel()
        return total

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token: 6 per matmul weight (forward + backward) plus attention.

        Matmul weights are the non-embedding parameters plus the LM head (tied or not); the
        attention term (scores and weighted sum over `seq_len` keys) is 12 * n_layer * n_embd * T,
        as in the PaLM paper's appendix B and nanoGPT's MFU estimate.
        """
        cfg = self.config
        matmul_params = self.num_params(exclude_embeddings=True)
        if cfg.tie_embeddings:  # the head's matmul is real work even though its weight is wte
            matmul_params += self.lm_head.weight.numel()
        attention = 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * (seq_len or cfg.block_size)
        return 6 * matmul_params + attention
