"""The KV cache of incremental decoding: keys and values per layer, per row, and each row's length.

The cache owns the positions: each row knows how many it holds, so a forward pass takes no
`start` argument. A pass feeds one or more groups of rows (`plan`); within a group each row
gets up to T new tokens (the rest of its T is padding), at its own position. The model asks the
cache for a `Pass` (positions, where keys are written, the attention mask) once per forward, each
layer stores its keys and values through it, and the rows move on when the pass ends.

A decoding engine keeps one group of rows that each feed one token (decode) and one group that
feeds a chunk of a prompt (prefill); `generate` feeds a single group of rows in lockstep.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Group:
    """One group of a pass: `rows` (contiguous cache rows), each feeding `fed[i]` <= T tokens."""

    rows: slice
    T: int
    fed: list[int]
    offset: int  # where the group's b * T tokens begin among the pass's tokens
    positions: Tensor  # (b, T) or (T,) when every row starts at the same position
    keys: int  # S: key positions attention reads (the longest row's, after this pass)
    mask: Tensor | None  # (b, 1, T, S) or (T, S) bool, True = visible; None: see `causal`
    causal: bool  # no mask: is_causal (fresh rows, T > 1), else every key is visible
    write_at: int | None  # the position all rows write their T keys at, or None (scattered)
    write_rows: Tensor | None  # (n,) cache rows of each real token, when scattered
    write_pos: Tensor | None  # (n,) their positions
    write_sel: Tensor | None  # (n,) their indices among the group's b * T tokens
    rope: tuple[Tensor, Tensor] | None = None  # set by the model: cos, sin at `positions`

    @property
    def size(self) -> int:
        return self.rows.stop - self.rows.start


class KVCache:
    """Keys and values of every layer for `batch` rows of up to `max_len` positions each.

    Allocated once: decoding writes new positions in place and attends over each row's filled
    prefix, so a token costs one pass over the weights and no recomputation of earlier ones.
    Unfilled positions hold zeros: attention masks them, and zeros keep masked sums finite.
    """

    def __init__(
        self, n_layer: int, batch: int, n_kv_head: int, max_len: int, head_dim: int,
        device: torch.device, dtype: torch.dtype,
    ) -> None:
        shape = (n_layer, batch, n_kv_head, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)  # (L, B, nkv, S, hs)
        self.v = torch.zeros(shape, device=device, dtype=dtype)  # (L, B, nkv, S, hs)
        self.max_len = max_len
        self.lengths = [0] * batch  # positions each row holds
        self._plan: list[tuple[slice, list[int]]] | None = None
        self.groups: list[Group] = []  # the pass in progress

    @property
    def batch(self) -> int:
        return len(self.lengths)

    @property
    def device(self) -> torch.device:
        return self.k.device

    def plan(self, groups: Sequence[tuple[slice, Sequence[int]]]) -> None:
        """The next forward feeds these groups: (rows, tokens per row), its idx (1, N) holding
        each group's rows one after another, each padded to the group's longest."""
        self._plan = [(rows, list(fed)) for rows, fed in groups]

    def reset(self, rows: slice | None = None) -> None:
        """Forget what `rows` (all by default) hold: their next token goes to position 0."""
        for r in range(*(rows or slice(0, self.batch)).indices(self.batch)):
            self.lengths[r] = 0

    def move(self, src: int, dst: int) -> None:
        """Row `src`'s keys, values and length into row `dst` (`src` is left as it was)."""
        n = self.lengths[src]
        self.k[:, dst, :, :n] = self.k[:, src, :, :n]
        self.v[:, dst, :, :n] = self.v[:, src, :, :n]
        self.lengths[dst] = n

    def swap(self, a: int, b: int) -> None:
        """Exchange rows a and b."""
        n = max(self.lengths[a], self.lengths[b])
        for t in (self.k, self.v):
            t[:, [a, b], :, :n] = t[:, [b, a], :, :n]
        self.lengths[a], self.lengths[b] = self.lengths[b], self.lengths[a]

    def begin(self, idx_shape: tuple[int, int]) -> list[Group]:
        """The pass for a forward over idx of `idx_shape`: the planned groups, or one group of
        rows 0..B-1 each feeding all T tokens of idx (B, T) when nothing was planned."""
        if self._plan is None:
            B, T = idx_shape
            plan = [(slice(0, B), [T] * B)]
        else:
            plan, self._plan = self._plan, None
        groups, offset = [], 0
        for rows, fed in plan:
            group = self._group(rows, fed, offset)
            groups.append(group)
            offset += group.size * group.T
        self.groups = groups
        return groups

    def _group(self, rows: slice, fed: list[int], offset: int) -> Group:
        device = self.device
        starts = self.lengths[rows]
        T = max(fed)
        ends = [s + n for s, n in zip(starts, fed, strict=True)]
        if max(ends) > self.max_len:
            raise ValueError(f"a row would hold {max(ends)} positions; it has {self.max_len}")
        S = max(ends)
        steps = torch.arange(T, device=device)
        if len(set(starts)) == 1 and all(n == T for n in fed):  # lockstep rows
            s = starts[0]
            mask = None if s == 0 or T == 1 else (
                torch.arange(S, device=device)[None, :] <= (s + steps)[:, None]  # (T, S)
            )
            return Group(rows, T, fed, offset, s + steps, S, mask, s == 0 and T > 1, s,
                         None, None, None)
        first = torch.tensor(starts, device=device)[:, None]  # (b, 1)
        positions = first + steps  # (b, T); padding runs past the end, never written
        mask = torch.arange(S, device=device) <= positions[:, None, :, None]  # (b, 1, T, S)
        real = torch.tensor([[t < n for t in range(T)] for n in fed], device=device)  # (b, T)
        row_ids = torch.arange(rows.start, rows.stop, device=device)[:, None].expand(-1, T)
        return Group(
            rows, T, fed, offset, positions.clamp(max=self.max_len - 1), S, mask, False, None,
            row_ids[real], positions[real], real.flatten().nonzero().squeeze(-1),
        )

    def update(self, layer: int, group: Group, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store the group's new keys and values k, v (b, nkv, T, hs) of `layer`; return all the
        group's keys and values (b, nkv, S, hs), in the cache's dtype."""
        kc, vc = self.k[layer], self.v[layer]  # (B, nkv, max_len, hs)
        rows = group.rows
        if group.write_at is not None:
            end = group.write_at + group.T
            kc[rows, :, group.write_at:end] = k
            vc[rows, :, group.write_at:end] = v
        else:  # each real token at its own (row, position)
            hs = k.size(-1)
            new_k = k.transpose(1, 2).reshape(-1, k.size(1), hs)[group.write_sel]  # (n, nkv, hs)
            new_v = v.transpose(1, 2).reshape(-1, v.size(1), hs)[group.write_sel]
            kc[group.write_rows, :, group.write_pos] = new_k.to(kc.dtype)
            vc[group.write_rows, :, group.write_pos] = new_v.to(vc.dtype)
        return kc[rows, :, : group.keys], vc[rows, :, : group.keys]

    def advance(self) -> None:
        """End the pass: every row of it now holds its fed tokens too."""
        for group in self.groups:
            for r, n in zip(range(group.rows.start, group.rows.stop), group.fed, strict=True):
                self.lengths[r] += n
        self.groups = []
