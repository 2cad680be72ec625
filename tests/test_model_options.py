"""The model's training options, each against the plain path or an independent reference: the
chunked cross-entropy ([train] loss_chunk) and document masking ([train] document_masking)."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from gpt.config import ModelConfig
from gpt.model import GPT, document_ids, document_mask, flex_attend

pytestmark = pytest.mark.usefixtures("one_thread")

EOT = 0


def loss_and_grads(model: GPT, idx: torch.Tensor, targets: torch.Tensor, dtype: torch.dtype,
                   chunk: int | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    model.loss_chunk = chunk
    autocast = (torch.autocast("cpu", dtype=dtype) if dtype != torch.float32
                else contextlib.nullcontext())
    with autocast:
        _, loss = model(idx, targets)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("softcap", [None, 3.0], ids=["plain", "softcap"])
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_chunked_loss_gives_the_plain_loss_and_gradients(
    dtype: torch.dtype, softcap: float | None, tie: bool, tiny_config: Callable[..., ModelConfig]
) -> None:
    """Chunks of 7 rows (not dividing the 48 tokens), a third of the targets -1."""
    torch.manual_seed(0)
    model = GPT(tiny_config(tie_embeddings=tie, logit_softcap=softcap))
    idx = torch.randint(0, 64, (3, 16))
    targets = torch.randint(0, 64, (3, 16))
    targets[torch.rand(3, 16) < 0.3] = -1
    plain_loss, plain = loss_and_grads(model, idx, targets, dtype, None)
    chunked_loss, chunked = loss_and_grads(model, idx, targets, dtype, 7)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(chunked_loss, plain_loss, **tol)
    assert plain.keys() == chunked.keys()
    for name in plain:
        torch.testing.assert_close(chunked[name], plain[name], **tol, msg=name)


def test_chunked_loss_of_only_ignored_targets_is_nan_as_the_plain_one(
    tiny_config: Callable[..., ModelConfig]
) -> None:
    model = GPT(tiny_config())
    idx, targets = torch.randint(0, 64, (2, 16)), torch.full((2, 16), -1)
    model.loss_chunk = 5
    assert model(idx, targets)[1].isnan() and model(idx, targets)[0] is None
    model.loss_chunk = None
    assert model(idx, targets)[1].isnan()


def largest_saved(model: GPT, idx: torch.Tensor) -> int:
    """The most elements of any tensor the forward pass keeps for the backward pass."""
    sizes = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(idx, idx)
    return max(sizes)


def test_chunked_loss_never_keeps_the_whole_logits(tiny_config: Callable[..., ModelConfig]) -> None:
    model = GPT(tiny_config(vocab_size=4096))  # the head's output far wider than anything else
    idx = torch.randint(0, 64, (4, 16))
    logits = idx.numel() * model.config.padded_vocab_size
    assert largest_saved(model, idx) >= logits
    model.loss_chunk = 8
    assert largest_saved(model, idx) <= 8 * model.config.padded_vocab_size


ROWS = {  # each row of 16 tokens: where its end-of-text tokens stand
    "several documents": [3, 9, 10],
    "one document": [],
    "a boundary at the last position": [15],
    "a boundary at the first position": [0, 6],
}


def rows_with_documents(boundaries: list[list[int]], T: int = 16) -> torch.Tensor:
    idx = torch.randint(1, 64, (len(boundaries), T))
    for row, positions in enumerate(boundaries):
        idx[row, positions] = EOT
    return idx


def segments(positions: list[int], T: int = 16) -> list[tuple[int, int]]:
    """The (start, stop) of each document of a row: an end-of-text token begins one."""
    starts = sorted({0, *positions})
    return list(zip(starts, [*starts[1:], T], strict=True))


def per_document_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           idx: torch.Tensor) -> torch.Tensor:
    """The reference: each document of each row attended on its own, plainly causal."""
    out = torch.empty_like(q)
    for row in range(idx.size(0)):
        positions = (idx[row] == EOT).nonzero().flatten().tolist()
        for a, b in segments(positions, idx.size(1)):
            out[row, :, a:b] = F.scaled_dot_product_attention(
                q[row, :, a:b], k[row, :, a:b], v[row, :, a:b], is_causal=True)
    return out


def test_document_ids_start_a_document_at_each_end_of_text() -> None:
    idx = torch.tensor([[5, EOT, 7, 8, EOT], [EOT, 1, 2, 3, 4]])
    assert document_ids(idx, EOT).tolist() == [[0, 1, 1, 1, 2], [1, 1, 1, 1, 1]]


@pytest.mark.parametrize("kind", ["dense", "flex", pytest.param("flex-compiled", marks=pytest.mark.slow)])
def test_document_mask_attends_within_each_document(kind: str) -> None:
    """Every kind of row in one batch, against attention run on each document alone. The CPU
    runs FlexAttention's forward only: eagerly (its reference implementation), or compiled as
    inside a compiled model."""
    torch.manual_seed(0)
    idx = rows_with_documents(list(ROWS.values()))
    q, k, v = (torch.randn(len(ROWS), 2, 16, 8) for _ in range(3))  # (B, nh, T, hs)
    expected = per_document_attention(q, k, v, idx)
    mask = document_mask(idx, EOT, flex=kind != "dense")
    if kind != "dense":
        attend = torch.compile(flex_attend) if kind == "flex-compiled" else flex_attend
        with warnings.catch_warnings(), torch.no_grad():  # eager flex_attention warns: unfused
            warnings.simplefilter("ignore")
            got = attend(q, k, v, mask)
    else:
        assert mask.shape == (len(ROWS), 1, 16, 16)
        got = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attention", ["sdpa", "manual"])
def test_a_document_sees_nothing_of_the_others(
    attention: str, tiny_config: Callable[..., ModelConfig]
) -> None:
    """With rotary positions attention depends only on distances, so each document's logits in
    a row are the logits of that document run alone."""
    torch.manual_seed(0)
    model = GPT(tiny_config(pos_embedding="rope", attention=attention)).eval()
    model.document_eot = EOT
    idx = rows_with_documents(list(ROWS.values()))
    with torch.no_grad():
        logits, _ = model(idx)
        for row, positions in enumerate(ROWS.values()):
            for a, b in segments(positions):
                alone, _ = model(idx[row : row + 1, a:b])
                torch.testing.assert_close(logits[row : row + 1, a:b], alone, rtol=1e-4,
                                           atol=1e-5)


def test_document_masking_trains_and_leaves_cached_decoding_causal(
    tiny_config: Callable[..., ModelConfig]
) -> None:
    torch.manual_seed(0)
    model = GPT(tiny_config(pos_embedding="rope"))
    idx = rows_with_documents([[3, 9], [5]])
    model.document_eot = EOT
    _, loss = model(idx, idx)
    loss.backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters())
    model.eval()
    with torch.no_grad():
        masked, _ = model(idx)
        cache = model.new_cache(2)
        cached, _ = model(idx, cache=cache)  # a prompt's prefill: plain causal attention
        model.document_eot = None
        plain, _ = model(idx)
    torch.testing.assert_close(cached, plain, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(masked, plain)


CUDA = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("flex", [pytest.param(True, marks=CUDA)], ids=["cuda"])
def test_flex_attention_trains_as_the_dense_mask_on_cuda(
    flex: bool, tiny_config: Callable[..., ModelConfig], monkeypatch: pytest.MonkeyPatch
) -> None:
    """FlexAttention's compiled forward and backward on the GPU against the dense mask's, rows
    of 256 tokens in several documents (FlexAttention's blocks are 128 wide)."""
    import gpt.model

    torch.manual_seed(0)
    model = GPT(tiny_config(block_size=256, n_embd=64, pos_embedding="rope")).cuda()
    model.document_eot = EOT
    idx = rows_with_documents([[3, 100, 129, 200], [], [255], [0, 128]], T=256).cuda()

    def run() -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        _, loss = model(idx, idx)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    flex_loss, flex_grads = run()
    dense = gpt.model.document_mask
    monkeypatch.setattr(gpt.model, "document_mask", lambda idx, eot, flex: dense(idx, eot, False))
    dense_loss, dense_grads = run()
    torch.testing.assert_close(flex_loss, dense_loss, rtol=1e-4, atol=1e-5)
    for a, b in zip(flex_grads, dense_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("softcap", [pytest.param(None, marks=CUDA), pytest.param(3.0, marks=CUDA)],
                         ids=["plain", "softcap"])
def test_chunked_loss_in_bfloat16_on_cuda(softcap: float | None,
                                          tiny_config: Callable[..., ModelConfig]) -> None:
    torch.manual_seed(0)
    model = GPT(tiny_config(logit_softcap=softcap, vocab_size=4096)).cuda()
    idx, targets = torch.randint(0, 4096, (4, 16)).cuda(), torch.randint(0, 4096, (4, 16)).cuda()
    targets[0, :5] = -1

    def run(chunk: int | None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        model.loss_chunk = chunk
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = model(idx, targets)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    (plain_loss, plain), (chunked_loss, chunked) = run(None), run(24)
    torch.testing.assert_close(chunked_loss, plain_loss, rtol=2e-2, atol=2e-3)
    for a, b in zip(chunked, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3)
