"""Judge questions that share their beginning are computed once up to where they differ.

A pairwise judgement asks the same question twice, with the answers in both
orders; all the pairs of one prompt's candidates share the request, and the
pairs that show the same answer first share it too; every question of a run
starts with the same rubric. Causal attention makes the hidden states of a
shared beginning independent of what follows, so:

- the beginning common to *all* questions of a call is run once, and its
  key/value cache is reused by every batch;
- each group of questions becomes one row laid out as a prefix tree: every
  stretch of tokens that some of the group's questions share is there once,
  with a block attention mask (a token sees the prefix, its ancestors in the
  tree and the tokens before it in its own stretch) and position ids that
  continue from where its parent stretch ends.

The verdict is read at each question's last tokens, which are never shared.
The numbers are those of separate forward passes up to float rounding
(tests/test_label_judge.py compares them). Against every question on its own
it is 1.5x fewer tokens on the benchmark's pairs (64 prompts, a pair each) and
2x fewer on all pairs of four candidates per prompt (scripts/bench/judge.py).
The same idea trains DPO (align.train.speedups.prefix_sharing).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# Below this many shared tokens a row of branches saves less than its longer attention costs.
MIN_SHARED_TOKENS = 8


def common_prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    return len(os.path.commonprefix([list(s) for s in sequences])) if sequences else 0


def share_groups(sequences: Sequence[Sequence[int]], offset: int, max_size: int) -> list[list[int]]:
    """Indices of sequences to pack together: at most ``max_size``, sharing at least MIN_SHARED_TOKENS after ``offset``.

    Sequences are taken in sorted order, which puts those with the longest common beginnings next to each other
    (all of one prompt's questions, and among them those that show the same answer first).
    """
    groups: list[list[int]] = []
    for i in sorted(range(len(sequences)), key=lambda i: list(sequences[i][offset:])):
        if groups and len(groups[-1]) < max_size:
            first = sequences[groups[-1][0]]
            if common_prefix_length([first[offset:], sequences[i][offset:]]) >= MIN_SHARED_TOKENS:
                groups[-1].append(i)
                continue
        groups.append([i])
    return groups


@dataclass
class PackedRows:
    """One forward pass: rows of prefix trees after a shared cached prefix of ``offset`` tokens."""

    input_ids: torch.Tensor  # [R, L]
    attention_mask: torch.Tensor  # [R, 1, L, offset + L], additive
    position_ids: torch.Tensor  # [R, L]
    reads: list[tuple[int, list[int]]]  # per question, in the order given: (row, the columns to read)
    tokens: int  # the rows' tokens, not counting padding


@dataclass
class _Stretch:
    """Tokens that the questions below it share, starting ``depth`` tokens after the cached prefix."""

    tokens: list[int]
    depth: int
    children: list[_Stretch] = field(default_factory=list)
    question: int | None = None  # set on a leaf: the question whose last tokens end here
    column: int = 0  # where the stretch starts in its packed row


def prefix_tree(rests: Sequence[Sequence[int]], keep: int) -> _Stretch:
    """The questions' tokens as a tree of shared stretches; each question keeps its last ``keep`` tokens to itself."""
    return _grow(rests, list(range(len(rests))), 0, keep)


def _grow(rests: Sequence[Sequence[int]], members: list[int], depth: int, keep: int) -> _Stretch:
    if len(members) == 1:
        return _Stretch(list(rests[members[0]][depth:]), depth, question=members[0])
    limit = min(len(rests[i]) for i in members) - keep
    common = common_prefix_length([rests[i][depth:] for i in members])
    shared = max(0, min(common, limit - depth))
    node = _Stretch(list(rests[members[0]][depth:depth + shared]), depth)
    below = depth + shared
    if shared < common:  # a question's last tokens would be shared: every question goes on alone
        node.children = [_grow(rests, [i], below, keep) for i in members]
        return node
    by_next: dict[int, list[int]] = {}
    for i in members:
        by_next.setdefault(rests[i][below], []).append(i)
    node.children = [_grow(rests, branch, below, keep) for branch in by_next.values()]
    return node


def _depth_first(root: _Stretch) -> Iterator[tuple[_Stretch, list[_Stretch]]]:
    """Each stretch with its ancestors, in the order a row lays them out."""
    stack: list[tuple[_Stretch, list[_Stretch]]] = [(root, [])]
    while stack:
        node, ancestors = stack.pop()
        yield node, ancestors
        stack += [(child, ancestors + [node]) for child in reversed(node.children)]


def pack_groups(groups: Sequence[Sequence[Sequence[int]]], offset: int, keep: int, pad_id: int,
                dtype: torch.dtype) -> PackedRows:
    """Pack groups of token sequences (all starting with the same ``offset`` tokens), one prefix tree per row.

    Each question's last ``keep`` positions are read.
    """
    import torch

    rows, positions, allowed, reads = [], [], [], []
    for r, group in enumerate(groups):
        laid_out = list(_depth_first(prefix_tree([seq[offset:] for seq in group], keep)))
        ids: list[int] = []
        pos: list[int] = []
        ends = [0] * len(group)  # per question, the column after its last token
        for node, _ in laid_out:
            node.column = len(ids)
            ids += node.tokens
            pos += range(offset + node.depth, offset + node.depth + len(node.tokens))
            if node.question is not None:
                ends[node.question] = len(ids)
        mask = torch.zeros(len(ids), len(ids), dtype=torch.bool)
        for node, ancestors in laid_out:
            here = slice(node.column, node.column + len(node.tokens))
            for above in ancestors:
                mask[here, above.column:above.column + len(above.tokens)] = True
            mask[here, here] = torch.tril(torch.ones(len(node.tokens), len(node.tokens), dtype=torch.bool))
        reads += [(r, list(range(end - keep, end))) for end in ends]
        rows.append(ids)
        positions.append(pos)
        allowed.append(mask)

    width = max(len(ids) for ids in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    position_ids = torch.zeros(len(rows), width, dtype=torch.long)
    # Padding attends to itself (and the prefix) only, so no softmax row is empty.
    visible = torch.eye(width, dtype=torch.bool).repeat(len(rows), 1, 1)
    for r, ids in enumerate(rows):
        input_ids[r, :len(ids)] = torch.tensor(ids)
        position_ids[r, :len(ids)] = torch.tensor(positions[r])
        visible[r, :len(ids), :len(ids)] = allowed[r]
    visible = torch.cat([torch.ones(len(rows), width, offset, dtype=torch.bool), visible], dim=2)
    additive = torch.zeros(len(rows), 1, width, offset + width, dtype=dtype)
    additive.masked_fill_(~visible[:, None], torch.finfo(dtype).min)
    return PackedRows(input_ids, additive, position_ids, reads, sum(map(len, rows)))
