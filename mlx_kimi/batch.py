"""One forward for the next positions of several sessions, each against its own KV caches.

mlx-lm's BatchKVCache does the batching: per layer the sessions' caches are merged (left-padded
to the longest), the slice runs once on all rows (deepseek_v3's attention takes the batch cache's
per-row offsets and padding mask), and each row's cache is extracted back to its session.

Merging and extracting copy every session's KV cache at every step. scripts/bench_streams.py
prints what that costs: on the bench's float32 20-layer tiny model (2-core CPU VM, 8 sessions at
1,024 positions) 70 ms of a 217-447 ms batched step, 16-33%, because that model's KV cache is
large beside its tiny weights. The alternative, batching all but the attention and running that
row by row on the sessions' own caches, re-reads the attention weights once per row: for Kimi a
fifth of a layer's active weights (~100M of ~500M parameters), more bytes than the copies
(4 x 1,152 bytes per position and layer in bf16) below about 12k positions. So: copy, and never
for a batch of one; past ~12k positions per session the row-by-row attention would move fewer
bytes.

Rows may differ in width (speculative steps: a token and its draft): a narrower row is padded at
its end with copies of its last position, so one forward reads the weights once for all of them.
Attention is causal and everything else works token by token, so the padding changes none of a
row's own positions; the cache entries it leaves are trimmed before the row's caches go back. What
the padding costs is compute (and, on an MoE, the experts its copies route to).
"""

import mlx.core as mx
from mlx_lm.models.cache import BatchKVCache

from .slice import ModelSlice


def forward_rows(model_slice: ModelSlice, inputs: list, caches: list, absorbed: bool | None = None) -> list:
    """inputs[i] (1, w_i) token ids or (1, w_i, D) hidden state of session i, whose caches are
    caches[i] (one per layer, updated in place like ModelSlice.forward's); returns each row's
    output (1, w_i, D) or logits (1, w_i, vocab). `absorbed` as in ModelSlice.forward."""
    if len(inputs) == 1:
        return [model_slice.forward(inputs[0], caches[0], absorbed)]
    widths = [x.shape[1] for x in inputs]
    width = max(widths)
    padded = [x if w == width else mx.concatenate([x, mx.repeat(x[:, -1:], width - w, axis=1)], axis=1)
              for x, w in zip(inputs, widths)]
    merged = [BatchKVCache.merge(list(layer)) for layer in zip(*caches)]
    out = model_slice.forward(mx.concatenate(padded), merged, absorbed)
    for layer, batch_cache in enumerate(merged):
        for row, session_caches in enumerate(caches):
            session_caches[layer] = batch_cache.extract(row)
            if widths[row] < width:
                session_caches[layer].trim(width - widths[row])
    return [out[row:row + 1, :w] for row, w in enumerate(widths)]
