"""The model's parts, each against an independent reference (torch.nn modules or naive math)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gpt.config import ModelConfig
from gpt.errors import GPTError
from gpt.model import ACTIVATIONS, GPT, MLP, Attention, RMSNorm, apply_rope, make_norm, rope_cache

VARIANTS = [
    dict(norm=norm, norm_position=pos, mlp=mlp, pos_embedding=pe, attention=attn)
    for norm, pos, mlp, pe, attn in itertools.product(
        ["layernorm", "rmsnorm"], ["pre", "post"], ["standard", "swiglu", "geglu"],
        ["learned", "rope"], ["sdpa", "manual"],
    )
]


def _id(v: dict) -> str:
    return "-".join(str(x) for x in v.values())


@pytest.mark.parametrize("variant", VARIANTS, ids=_id)
def test_causality_every_variant(variant: dict, tiny_config: Callable[..., ModelConfig]) -> None:
    """Changing tokens after position t leaves the logits at positions <= t unchanged."""
    torch.manual_seed(0)
    model = GPT(tiny_config(**variant)).eval()
    idx = torch.randint(0, 64, (2, 16))
    t = 7
    changed = idx.clone()
    changed[:, t + 1 :] = torch.randint(0, 64, (2, 16 - t - 1))
    assert not torch.equal(changed, idx)
    a, _ = model(idx)
    b, _ = model(changed)
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, t + 1 :], b[:, t + 1 :])  # the future did change something


@pytest.mark.parametrize("extra", [
    {}, {"n_kv_head": 2}, {"n_kv_head": 1, "pos_embedding": "rope"},
    {"qk_norm": True}, {"qk_norm": True, "n_kv_head": 2, "pos_embedding": "rope"},
])
def test_sdpa_and_manual_attention_agree(extra: dict, tiny_config: Callable[..., ModelConfig]) -> None:
    """Outputs and gradients of the two attention implementations match to 1e-5."""
    torch.manual_seed(0)
    sdpa = GPT(tiny_config(attention="sdpa", **extra))
    manual = GPT(tiny_config(attention="manual", **extra))
    manual.load_state_dict(sdpa.state_dict())
    idx = torch.randint(0, 64, (3, 16))
    out_s, loss_s = sdpa(idx, idx)
    out_m, loss_m = manual(idx, idx)
    torch.testing.assert_close(out_s, out_m, rtol=0, atol=1e-5)
    loss_s.backward()
    loss_m.backward()
    for (name, p_s), p_m in zip(sdpa.named_parameters(), manual.parameters(), strict=True):
        torch.testing.assert_close(p_s.grad, p_m.grad, rtol=0, atol=1e-5, msg=name)


def test_manual_attention_is_the_textbook_formula(tiny_config: Callable[..., ModelConfig]) -> None:
    """softmax(QK^T/sqrt(d) + causal -inf mask) V, computed naively per head, equals the module."""
    torch.manual_seed(0)
    cfg = tiny_config(attention="manual", bias=False)
    attn = Attention(cfg).eval()
    x = torch.randn(2, 10, 32)
    q, k, v = attn.c_attn(x).split(32, dim=-1)
    heads = []
    for h in range(4):
        sl = slice(8 * h, 8 * (h + 1))
        scores = q[..., sl] @ k[..., sl].transpose(-1, -2) / math.sqrt(8)
        future = torch.triu(torch.ones(10, 10, dtype=torch.bool), diagonal=1)
        weights = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)
        heads.append(weights @ v[..., sl])
    expected = attn.c_proj(torch.cat(heads, dim=-1))
    torch.testing.assert_close(attn(x), expected, rtol=0, atol=1e-6)


def naive_rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)


@pytest.mark.parametrize("attention", ["sdpa", "manual"])
def test_qk_norm_is_per_head_rms_norm_of_q_and_k(attention: str, tiny_config: Callable[..., ModelConfig]) -> None:
    """Each head's q and k divided by their RMS (no gain), then the textbook attention."""
    torch.manual_seed(0)
    attn = Attention(tiny_config(attention=attention, qk_norm=True, norm_eps=1e-5)).eval()
    x = torch.randn(2, 10, 32)
    q, k, v = attn.c_attn(x).split(32, dim=-1)
    heads = []
    for h in range(4):
        sl = slice(8 * h, 8 * (h + 1))
        qh, kh = naive_rms(q[..., sl], 1e-5), naive_rms(k[..., sl], 1e-5)
        scores = qh @ kh.transpose(-1, -2) / math.sqrt(8)
        future = torch.triu(torch.ones(10, 10, dtype=torch.bool), diagonal=1)
        heads.append(torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1) @ v[..., sl])
    torch.testing.assert_close(attn(x), attn.c_proj(torch.cat(heads, dim=-1)), rtol=0, atol=1e-6)
    assert sum(p.numel() for p in attn.parameters()) == sum(
        p.numel() for p in Attention(tiny_config()).parameters()
    )  # no learned gain: the same weights as without


@pytest.mark.parametrize("pos_embedding", ["learned", "rope"])
@pytest.mark.parametrize("attention", ["sdpa", "manual"])
def test_qk_norm_gives_attention_unit_rms_queries_and_keys(
    attention: str, pos_embedding: str, tiny_config: Callable[..., ModelConfig],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What reaches the attention kernel, per head and position, has RMS 1 (RoPE rotates after
    the norm, which keeps it); without qk_norm it does not."""
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    if attention == "sdpa":
        kernel = F.scaled_dot_product_attention
        monkeypatch.setattr(F, "scaled_dot_product_attention",
                            lambda q, k, v, **kw: seen.append((q, k)) or kernel(q, k, v, **kw))
    else:
        manual = Attention._manual_attention
        monkeypatch.setattr(Attention, "_manual_attention",
                            lambda self, q, k, v, mask: seen.append((q, k)) or manual(self, q, k, v, mask))
    idx = torch.randint(0, 64, (2, 16))
    for qk_norm in (True, False):
        seen.clear()
        torch.manual_seed(0)
        cfg = tiny_config(attention=attention, pos_embedding=pos_embedding, qk_norm=qk_norm,
                          norm_eps=1e-8)  # an eps that leaves the RMS at 1 to float precision
        GPT(cfg)(idx)
        assert len(seen) == 2  # one per layer
        for q, k in seen:  # (B, nh, T, hs)
            for t in (q, k):
                rms = t.pow(2).mean(-1).sqrt()  # (B, nh, T)
                if qk_norm:
                    torch.testing.assert_close(rms, torch.ones_like(rms), rtol=0, atol=1e-5)
                else:
                    assert (rms - 1).abs().min() > 0.5


def test_qk_norm_changes_the_output(tiny_config: Callable[..., ModelConfig]) -> None:
    torch.manual_seed(0)
    plain = GPT(tiny_config()).eval()
    normed = GPT(tiny_config(qk_norm=True)).eval()
    normed.load_state_dict(plain.state_dict())  # the same weights: qk_norm adds none
    idx = torch.randint(0, 64, (2, 16))
    assert not torch.allclose(plain(idx)[0], normed(idx)[0], atol=1e-4)


def test_grouped_query_heads_share_keys_and_values(tiny_config: Callable[..., ModelConfig]) -> None:
    """With n_kv_head=1 every query head reads the same K/V: equal to MHA with K/V copied."""
    torch.manual_seed(0)
    gqa = Attention(tiny_config(n_kv_head=1)).eval()
    mha = Attention(tiny_config()).eval()
    w_q, w_k, w_v = gqa.c_attn.weight.split([32, 8, 8])
    b_q, b_k, b_v = gqa.c_attn.bias.split([32, 8, 8])
    with torch.no_grad():
        mha.c_attn.weight.copy_(torch.cat([w_q, w_k.repeat(4, 1), w_v.repeat(4, 1)]))
        mha.c_attn.bias.copy_(torch.cat([b_q, b_k.repeat(4), b_v.repeat(4)]))
        mha.c_proj.load_state_dict(gqa.c_proj.state_dict())
    x = torch.randn(2, 9, 32)
    assert gqa.c_attn.weight.shape == (48, 32)
    torch.testing.assert_close(gqa(x), mha(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("attention", ["sdpa", "manual"])
def test_cross_attention_uses_context_not_future_tokens(attention: str, tiny_config: Callable[..., ModelConfig]) -> None:
    torch.manual_seed(0)
    model = GPT(tiny_config(cross_attention=True, attention=attention)).eval()
    idx = torch.randint(0, 64, (2, 16))
    context = torch.randn(2, 5, 32)
    base, _ = model(idx, context=context)
    other_context, _ = model(idx, context=torch.randn(2, 5, 32))
    assert not torch.allclose(base, other_context, atol=1e-4)  # depends on the context
    changed = idx.clone()
    changed[:, 8:] = (changed[:, 8:] + 1) % 64
    future, _ = model(changed, context=context)
    torch.testing.assert_close(base[:, :8], future[:, :8], rtol=0, atol=1e-6)  # still causal
    shorter, _ = model(idx, context=context[:, :3])  # any context length works
    assert shorter.shape == base.shape


def test_cross_attention_matches_naive_unmasked_attention(tiny_config: Callable[..., ModelConfig]) -> None:
    """Queries from x, keys/values from the context through the same fused weight, no mask."""
    torch.manual_seed(0)
    attn = Attention(tiny_config(n_head=1), causal=False).eval()
    x, ctx = torch.randn(1, 6, 32), torch.randn(1, 4, 32)
    w_q, w_k, w_v = attn.c_attn.weight.split(32)
    b_q, b_k, b_v = attn.c_attn.bias.split(32)
    q, k, v = x @ w_q.T + b_q, ctx @ w_k.T + b_k, ctx @ w_v.T + b_v
    expected = attn.c_proj(torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(32), dim=-1) @ v)
    torch.testing.assert_close(attn(x, context=ctx), expected, rtol=0, atol=1e-6)


def test_cross_attention_model_requires_context(tiny_config: Callable[..., ModelConfig]) -> None:
    model = GPT(tiny_config(cross_attention=True))
    with pytest.raises(GPTError, match="context"):
        model(torch.zeros(1, 4, dtype=torch.long))


@pytest.mark.parametrize("bias", [True, False])
def test_layernorm_is_the_textbook_formula(bias: bool, tiny_config: Callable[..., ModelConfig]) -> None:
    """(x - mean) / sqrt(var + eps) * weight (+ bias), with no bias parameter when bias=False."""
    torch.manual_seed(0)
    norm = make_norm(tiny_config(bias=bias, norm_eps=1e-5))
    with torch.no_grad():
        norm.weight.normal_()
        if bias:
            norm.bias.normal_()
    x = torch.randn(4, 7, 32) * 3 + 1
    mean, var = x.mean(-1, keepdim=True), x.var(-1, keepdim=True, unbiased=False)
    expected = (x - mean) / torch.sqrt(var + 1e-5) * norm.weight + (norm.bias if bias else 0)
    torch.testing.assert_close(norm(x), expected)
    assert (norm.bias is None) == (not bias)
    assert sorted(dict(norm.named_parameters())) == (["bias", "weight"] if bias else ["weight"])


def test_rmsnorm_matches_torch() -> None:
    torch.manual_seed(0)
    ours, ref = RMSNorm(32, eps=1e-6), nn.RMSNorm(32, eps=1e-6)
    with torch.no_grad():
        ours.weight.normal_()
        ref.weight.copy_(ours.weight)
    x = torch.randn(4, 7, 32) * 3 + 1
    torch.testing.assert_close(ours(x), ref(x))


@pytest.mark.parametrize(
    "name, reference",
    [
        ("gelu", nn.GELU()),
        ("gelu_tanh", nn.GELU(approximate="tanh")),
        ("relu", nn.ReLU()),
        ("leaky_relu", nn.LeakyReLU()),
        ("silu", nn.SiLU()),
        ("sigmoid", nn.Sigmoid()),
        ("tanh", nn.Tanh()),
    ],
)
def test_activations_match_torch_modules(name: str, reference: nn.Module) -> None:
    x = torch.linspace(-6, 6, 101)
    torch.testing.assert_close(ACTIVATIONS[name](x), reference(x))


def test_relu2_is_relu_squared() -> None:
    x = torch.linspace(-6, 6, 101, requires_grad=True)
    torch.testing.assert_close(ACTIVATIONS["relu2"](x), torch.relu(x) ** 2, rtol=0, atol=0)
    ACTIVATIONS["relu2"](x).sum().backward()
    torch.testing.assert_close(x.grad, 2 * torch.relu(x.detach()))  # d/dx relu(x)^2


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
def test_standard_mlp_is_w2_act_w1(activation: str, tiny_config: Callable[..., ModelConfig]) -> None:
    torch.manual_seed(0)
    mlp = MLP(tiny_config(activation=activation)).eval()
    x = torch.randn(2, 5, 32)
    expected = mlp.c_proj(ACTIVATIONS[activation](mlp.c_fc(x)))
    torch.testing.assert_close(mlp(x), expected)
    assert mlp.c_fc.out_features == 128 and mlp.c_up is None


@pytest.mark.parametrize("kind, act", [("swiglu", F.silu), ("geglu", F.gelu)])
def test_gated_mlp_formula_and_width(kind: str, act, tiny_config: Callable[..., ModelConfig]) -> None:
    torch.manual_seed(0)
    mlp = MLP(tiny_config(mlp=kind, n_embd=96, n_head=4)).eval()
    assert mlp.c_fc.out_features == 256  # 8/3 * 96 = 256, already a multiple of 64
    assert MLP(tiny_config(mlp=kind)).c_fc.out_features == 128  # 8/3 * 32 = 85.3 -> 128
    assert MLP(tiny_config(mlp=kind, mlp_hidden=40)).c_fc.out_features == 40
    x = torch.randn(2, 5, 96)
    w1, w3, w2 = mlp.c_fc.weight, mlp.c_up.weight, mlp.c_proj.weight
    expected = (act(x @ w1.T + mlp.c_fc.bias) * (x @ w3.T + mlp.c_up.bias)) @ w2.T + mlp.c_proj.bias
    torch.testing.assert_close(mlp(x), expected)


def test_rope_rotates_pairs_and_keeps_relative_positions() -> None:
    """q.k after RoPE depends only on the distance between positions, and norms are preserved."""
    torch.manual_seed(0)
    cos, sin = rope_cache(32, 8, 10000.0)
    q, k = torch.randn(8), torch.randn(8)

    def at(vec: torch.Tensor, pos: int) -> torch.Tensor:
        return apply_rope(vec.view(1, 1, 1, 8), cos[pos : pos + 1], sin[pos : pos + 1]).view(8)

    torch.testing.assert_close(at(q, 5).norm(), q.norm())
    torch.testing.assert_close(at(q, 3) @ at(k, 1), at(q, 12) @ at(k, 10), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(at(q, 0), q)  # position 0 is the identity


def test_pre_and_post_norm_placement(tiny_config: Callable[..., ModelConfig]) -> None:
    """Pre-LN computes x + f(norm(x)) and has a final norm; Post-LN computes norm(x + f(x))."""
    torch.manual_seed(0)
    pre, post = GPT(tiny_config(norm_position="pre")), GPT(tiny_config(norm_position="post"))
    assert "ln_f" in pre.transformer and "ln_f" not in post.transformer
    x = torch.randn(1, 4, 32)
    block = post.transformer.h[0].eval()
    h = block.ln_1(x + block.attn(x))
    expected = block.ln_2(h + block.mlp(h))
    torch.testing.assert_close(block(x), expected)
    block = pre.transformer.h[0].eval()
    h = x + block.attn(block.ln_1(x))
    torch.testing.assert_close(block(x), h + block.mlp(block.ln_2(h)))


def test_weight_tying_is_one_parameter(tiny_config: Callable[..., ModelConfig]) -> None:
    tied, untied = GPT(tiny_config(tie_embeddings=True)), GPT(tiny_config(tie_embeddings=False))
    assert tied.lm_head.weight is tied.transformer.wte.weight
    assert untied.lm_head.weight is not untied.transformer.wte.weight
    table = 64 * 32
    assert untied.num_params() - tied.num_params() == table  # the head is counted once when tied
    loss = tied(torch.randint(0, 64, (1, 8)), torch.randint(0, 64, (1, 8)))[1]
    loss.backward()  # the shared matrix gathers gradients from both uses
    assert tied.transformer.wte.weight.grad is tied.lm_head.weight.grad


def test_dropout_only_in_training(tiny_config: Callable[..., ModelConfig]) -> None:
    torch.manual_seed(0)
    model = GPT(tiny_config(dropout=0.2))
    idx = torch.randint(0, 64, (2, 16))
    model.train()
    assert not torch.equal(model(idx)[0], model(idx)[0])
    model.eval()
    torch.testing.assert_close(model(idx)[0], model(idx)[0], rtol=0, atol=0)
    no_dropout = GPT(tiny_config(dropout=0.0)).train()
    torch.testing.assert_close(no_dropout(idx)[0], no_dropout(idx)[0], rtol=0, atol=0)


def closed_form_params(cfg: ModelConfig) -> int:
    """Parameter count from the architecture's formula, independent of the module tree."""
    c, v, h, kv = cfg.n_embd, cfg.vocab_size, cfg.hidden_dim, cfg.kv_heads * cfg.head_dim
    b = 1 if cfg.bias else 0
    norm = c * (2 if cfg.norm == "layernorm" and cfg.bias else 1)
    attn = c * (c + 2 * kv) + b * (c + 2 * kv) + c * c + b * c
    n_mats = 3 if cfg.mlp != "standard" else 2
    mlp = n_mats * c * h + b * ((n_mats - 1) * h + c)
    block = attn + mlp + 2 * norm
    if cfg.cross_attention:
        block += attn + norm
    total = v * c + cfg.n_layer * block
    total += cfg.block_size * c if cfg.pos_embedding == "learned" else 0
    total += norm if cfg.norm_position == "pre" else 0
    total += 0 if cfg.tie_embeddings else v * c
    return total


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        dict(bias=False, tie_embeddings=False),
        dict(norm="rmsnorm", mlp="swiglu", pos_embedding="rope", n_kv_head=2),
        dict(norm_position="post", mlp="geglu", cross_attention=True),
    ],
)
def test_param_count_closed_form(overrides: dict, tiny_config: Callable[..., ModelConfig]) -> None:
    cfg = tiny_config(**overrides)
    assert GPT(cfg).num_params() == closed_form_params(cfg)


def test_vocabulary_is_padded_to_a_multiple_of_64_unless_set(tiny_config: Callable[..., ModelConfig]) -> None:
    assert ModelConfig(vocab_size=50257).padded_vocab_size == 50304
    assert ModelConfig(vocab_size=64).padded_vocab_size == 64
    assert ModelConfig(vocab_size=65).padded_vocab_size == 128
    assert ModelConfig(vocab_size=65, padded_vocab_size=65).padded_vocab_size == 65
    assert ModelConfig().padded_vocab_size is None
    with pytest.raises(GPTError, match="padded_vocab_size: 60 is smaller than vocab_size = 65"):
        ModelConfig(vocab_size=65, padded_vocab_size=60)
    model = GPT(tiny_config(vocab_size=50))
    assert model.lm_head.weight.shape[0] == 64 and model.transformer.wte.weight.shape[0] == 64


def test_gpt2_124m_size_and_flops() -> None:
    """The GPT-2 small shape (its vocabulary unpadded) gives the published 124M and nanoGPT's
    FLOPs-per-token formula."""
    cfg = ModelConfig(vocab_size=50257, padded_vocab_size=50257)
    with torch.device("meta"):
        model = GPT(cfg)
    assert model.num_params() == 124_439_808
    non_embedding = 124_439_808 - 50257 * 768 - 1024 * 768
    assert model.num_params(exclude_embeddings=True) == non_embedding
    expected = 6 * (non_embedding + 50257 * 768) + 12 * 12 * 768 * 1024
    assert model.flops_per_token() == expected


WIDEST = math.isqrt((2**60 - 1) // 3)  # c_attn is n_embd x 3 n_embd
# (sizes at the largest ModelConfig takes, the tensor they make, the key one step beyond names)
LARGEST = [
    (dict(n_embd=WIDEST, mlp_hidden=64), "transformer.h.0.attn.c_attn.weight", "n_embd"),
    (dict(mlp_hidden=2**54 - 1), "transformer.h.0.mlp.c_fc.weight", "mlp_hidden"),
    (dict(vocab_size=2**54 - 64), "transformer.wte.weight", "vocab_size"),  # padded to 64s
    (dict(block_size=2**54 - 1), "transformer.wpe.weight", "block_size"),
    (dict(block_size=2**30 - 1, attention="manual"), "transformer.h.0.attn.mask", "block_size"),
]


@pytest.mark.parametrize("sizes, tensor, key", LARGEST, ids=[key for _, _, key in LARGEST])
def test_every_size_the_config_takes_builds(sizes: dict, tensor: str, key: str) -> None:
    """Up to just under 2**60 elements in one tensor, ModelConfig's bound, torch builds the
    model (on the meta device: shapes only, as gpt info does); one step beyond, the config
    refuses by name, where torch would overflow deep inside (as it does at 2**61 float32s)."""
    cfg = dict(n_embd=64, n_head=1, n_layer=1, vocab_size=64, block_size=64)
    with torch.device("meta"):
        model = GPT(ModelConfig(**{**cfg, **sizes}))
    found = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    assert 2**59 <= found[tensor].numel() < 2**60
    beyond = {k: v + 1 if k == key else v for k, v in sizes.items()}
    with pytest.raises(GPTError, match=rf"\[model\] {key}: {beyond[key]} makes .* elements; "
                                       r"torch holds fewer than 2\*\*60 in one tensor; lower it"):
        ModelConfig(**{**cfg, **beyond})
    with pytest.raises(RuntimeError, match="overflow"):
        torch.empty(2**61, device="meta")


def test_depth_is_bounded() -> None:
    """n_layer blocks are built one by one: more than ten thousand is refused by name."""
    assert ModelConfig(n_layer=10_000).n_layer == 10_000
    with pytest.raises(GPTError, match=r"\[model\] n_layer: 10,001 blocks are more than the "
                                       r"10,000 gpt builds; lower it"):
        ModelConfig(n_layer=10_001)


def test_gpt2_initialisation() -> None:
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=512, block_size=64, n_layer=8, n_head=4, n_embd=256))
    h = model.transformer.h[0]
    assert abs(h.attn.c_attn.weight.std().item() - 0.02) < 0.002
    residual_std = 0.02 / math.sqrt(2 * 8)
    assert abs(h.attn.c_proj.weight.std().item() - residual_std) < 0.001
    assert abs(h.mlp.c_proj.weight.std().item() - residual_std) < 0.001
    assert torch.count_nonzero(h.attn.c_attn.bias) == 0
    assert torch.equal(h.ln_1.weight, torch.ones(256))


def test_zero_init_proj_zeroes_the_residual_writers_only(tiny_config: Callable[..., ModelConfig]) -> None:
    """Every c_proj (attention, cross-attention, MLP) starts at zero, nothing else does, and
    each block starts as the identity."""
    torch.manual_seed(0)
    model = GPT(tiny_config(zero_init_proj=True, cross_attention=True))
    zero = {name for name, p in model.named_parameters() if p.dim() == 2 and not p.any()}
    assert zero == {f"transformer.h.{i}.{part}.c_proj.weight" for i in range(2)
                    for part in ("attn", "cross_attn", "mlp")}
    x, context = torch.randn(2, 5, 32), torch.randn(2, 3, 32)
    torch.testing.assert_close(model.transformer.h[0](x, context=context), x, rtol=0, atol=0)
    default = GPT(tiny_config())
    assert all(p.any() for name, p in default.named_parameters() if name.endswith("c_proj.weight"))


def test_zero_init_proj_model_trains(tiny_config: Callable[..., ModelConfig]) -> None:
    """The projections get gradients from the first step, and the rest follows: the loss falls."""
    torch.manual_seed(0)
    model = GPT(tiny_config(zero_init_proj=True))
    data = torch.randint(0, 64, (4, 17))
    x, y = data[:, :-1], data[:, 1:]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    for _ in range(20):
        _, loss = model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(p.any() for name, p in model.named_parameters() if name.endswith("c_proj.weight"))
    assert losses[-1] < losses[0] - 0.5


def test_loss_ignores_minus_one_targets(tiny_config: Callable[..., ModelConfig]) -> None:
    torch.manual_seed(0)
    model = GPT(tiny_config()).eval()
    idx = torch.randint(0, 64, (2, 16))
    targets = torch.randint(0, 64, (2, 16))
    targets[:, :5] = -1
    logits, loss = model(idx, targets)
    expected = F.cross_entropy(logits[:, 5:].reshape(-1, 64), targets[:, 5:].reshape(-1))
    torch.testing.assert_close(loss, expected)


def test_logit_softcap_squashes_the_plain_logits(tiny_config: Callable[..., ModelConfig]) -> None:
    """The capped model's logits are cap * tanh(plain / cap) of the same weights, inside
    (-cap, cap), and its loss is the cross-entropy of those."""
    torch.manual_seed(0)
    plain = GPT(tiny_config()).eval()
    with torch.no_grad():
        plain.lm_head.weight.mul_(100.0)  # logits far past the cap
    capped = GPT(tiny_config(logit_softcap=2.0)).eval()
    capped.load_state_dict(plain.state_dict())
    idx, targets = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))
    raw, _ = plain(idx)
    assert raw.abs().max() > 10.0
    logits, loss = capped(idx, targets)
    torch.testing.assert_close(logits, 2.0 * torch.tanh(raw / 2.0))
    assert logits.abs().max() <= 2.0  # equal only where float32's tanh rounds to 1
    torch.testing.assert_close(loss, F.cross_entropy(logits.view(-1, 64), targets.view(-1)))


def test_logit_softcap_far_above_the_logits_changes_nothing(tiny_config: Callable[..., ModelConfig]) -> None:
    torch.manual_seed(0)
    plain = GPT(tiny_config()).eval()
    capped = GPT(tiny_config(logit_softcap=1e6)).eval()
    capped.load_state_dict(plain.state_dict())
    idx = torch.randint(0, 64, (2, 16))
    torch.testing.assert_close(capped(idx)[0], plain(idx)[0], rtol=1e-5, atol=1e-6)


def test_logit_softcap_gradients_stay_finite(tiny_config: Callable[..., ModelConfig]) -> None:
    """Saturated logits (|logits| >> cap) still give a finite loss and finite gradients."""
    torch.manual_seed(0)
    model = GPT(tiny_config(logit_softcap=5.0))
    with torch.no_grad():
        model.lm_head.weight.mul_(1e4)
    _, loss = model(torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16)))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_too_long_sequence_is_a_clear_error(tiny_config: Callable[..., ModelConfig]) -> None:
    with pytest.raises(GPTError, match="block_size"):
        GPT(tiny_config())(torch.zeros(1, 17, dtype=torch.long))


@pytest.mark.parametrize(
    "variant",
    [
        dict(norm="layernorm", activation="gelu_tanh", pos_embedding="learned", bias=True),
        dict(norm="rmsnorm", mlp="swiglu", pos_embedding="rope", bias=False),
    ],
    ids=["gpt2", "rmsnorm-swiglu-rope"],
)
def test_tiny_model_overfits_one_sequence(variant: dict) -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, block_size=64, n_layer=2, n_head=4, n_embd=64, **variant)
    model = GPT(cfg)
    data = torch.randint(0, 64, (1, 65))
    x, y = data[:, :-1], data[:, 1:]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for _ in range(300):
        _, loss = model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if loss.item() < 0.05:
            break
    assert loss.item() < 0.05


def test_padded_vocab_size_needs_vocab_size() -> None:
    with pytest.raises(GPTError, match="padded_vocab_size: is set but vocab_size is not"):
        ModelConfig(padded_vocab_size=64)


@pytest.mark.parametrize("variant", [
    {}, {"mlp": "swiglu", "pos_embedding": "rope", "norm": "rmsnorm"},
    {"norm_position": "post", "cross_attention": True},
], ids=["gpt2", "llama", "post-ln-cross"])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(
    variant: dict, tiny_config: Callable[..., ModelConfig]
) -> None:
    """Recomputing each block in the backward pass changes memory, not results: the same loss
    and gradients, bit for bit, with dropout drawing the same masks again."""
    torch.manual_seed(0)
    model = GPT(tiny_config(dropout=0.2, **variant)).train()
    idx = torch.randint(0, 64, (2, 16))
    context = torch.randn(2, 5, model.config.n_embd) if model.config.cross_attention else None
    results = []
    for recompute in (False, True):
        model.activation_checkpointing = recompute
        model.zero_grad()
        torch.manual_seed(1)  # the same dropout masks in both runs
        _, loss = model(idx, idx, context=context)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss_plain, grads_plain), (loss_recomputed, grads_recomputed) = results
    assert torch.equal(loss_plain, loss_recomputed)
    for name, grad in grads_plain.items():
        assert torch.equal(grad, grads_recomputed[name]), name


def test_activation_checkpointing_recomputes_each_block_once_in_training_only(
    tiny_config: Callable[..., ModelConfig],
) -> None:
    model = GPT(tiny_config())
    model.activation_checkpointing = True
    calls = []
    for block in model.transformer.h:
        block.register_forward_pre_hook(lambda *args: calls.append(1))
    idx = torch.randint(0, 64, (2, 16))
    _, loss = model.train()(idx, idx)
    loss.backward()
    assert len(calls) == 2 * model.config.n_layer  # forward, then again in the backward pass
    calls.clear()
    with torch.no_grad():
        model(idx)
    model.eval()(idx)
    assert len(calls) == 2 * model.config.n_layer  # once per forward: nothing to recompute
