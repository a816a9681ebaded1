"""A KV cache whose full-attention layers append each token into spare room instead of copying the cache.

transformers' ``DynamicLayer`` grows by ``torch.cat``: every decoding step copies every layer's whole cache
to add one token. :class:`GrowingLayer` keeps its keys and values in buffers with room for
:data:`SPARE_TOKENS` more and writes new tokens in place; its ``keys``/``values`` are views of the filled
part, so whatever reads or replaces them (attention, transformers' ``batch_select_indices``,
align.generate.decode's compaction and joining) works as on a ``DynamicLayer``. Tensors replaced from
outside are copied into a fresh buffer at the next update: one copy per compaction, not one per token.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

# Tokens of room a buffer gets beyond what it holds: a copy every 64 steps instead of every step.
SPARE_TOKENS = 64


class GrowingLayer(DynamicLayer):
    """A ``DynamicLayer`` that writes new keys and values into spare room (see the module's docstring)."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.key_room: torch.Tensor | None = None
        self.value_room: torch.Tensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        used = self.keys.shape[-2] if self.keys.numel() else 0
        end = used + key_states.shape[-2]
        if not (_fits(self.keys, self.key_room, end) and _fits(self.values, self.value_room, end)):
            self.key_room = _new_room(self.keys, key_states, used, end)
            self.value_room = _new_room(self.values, value_states, used, end)
        assert self.key_room is not None and self.value_room is not None
        self.key_room[..., used:end, :] = key_states
        self.value_room[..., used:end, :] = value_states
        self.keys, self.values = self.key_room[..., :end, :], self.value_room[..., :end, :]
        return self.keys, self.values


def _fits(held: torch.Tensor, room: torch.Tensor | None, end: int) -> bool:
    """Whether ``held`` is still the start of ``room`` (not replaced from outside) and ``room`` reaches ``end``."""
    return (room is not None and held.numel() > 0 and held.data_ptr() == room.data_ptr()
            and held.shape[:2] == room.shape[:2] and held.stride() == room.stride() and room.shape[-2] >= end)


def _new_room(held: torch.Tensor, states: torch.Tensor, used: int, end: int) -> torch.Tensor:
    batch, heads, _, dim = states.shape
    room = states.new_empty(batch, heads, end + SPARE_TOKENS, dim)
    if used:
        room[..., :used, :] = held
    return room


def growing_cache(config: Any) -> DynamicCache:
    """transformers' dynamic cache for ``config``, its plain full-attention layers growing in place."""
    cache = DynamicCache(config=config)
    cache.layers = [GrowingLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache
