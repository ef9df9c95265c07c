"""mlx-lm's DeepSeek-V3 decoder layer, whose attention can keep MLA's absorbed form for a step of
several positions: what a speculative step (a token and its draft) and a short prefill chunk deep
into the context need.

MLA caches one latent per position (kv_lora_rank wide, shared by every head). mlx-lm attends to
it in two ways: a one-position step (decode) folds the key and value up-projections into the
query and the output (absorbed: attention runs against the latent itself); a step of more positions
(prefill) first up-projects the whole cache into per-head keys and values. That costs the cache's
length x heads x kv_lora_rank x (key + value head widths) x 2 FLOPs per layer (Kimi: 16.8 MFLOP per
cached position and layer), whatever the step's width: worth it for a long prefill chunk, but for a
verify step of a few positions at 4k positions of context it is more than the step's own compute.
A step with `absorbed` runs the decode's form at any width, so it costs what its queries cost.
The two forms are the same function; they round differently (float32: logits within a few 1e-6).

A prefill chunk takes the absorbed form where it saves at least half the attention's FLOPs
(`absorbed_pays`): a short chunk deep into the context, as an agent's next turn is (its new
message or tool result after a cached conversation). A prompt's first chunk never does (there the
up-projection covers only the chunk itself), nor a long chunk (each of its queries then pays the
latent's width, which the up-projection would have shared).
"""

from typing import Any, Optional

import mlx.core as mx
from mlx_lm.models.base import scaled_dot_product_attention
from mlx_lm.models.deepseek_v3 import DeepseekV3Attention, DeepseekV3DecoderLayer, ModelArgs


ABSORBED_SAVING = 0.5  # a prefill chunk attends absorbed where that needs at most this share of the FLOPs


def attention_flops(args: ModelArgs, positions: int, cached: int, absorbed: bool) -> int:
    """Multiply-adds x 2 of one layer's attention for a step of `positions` after `cached` ones,
    leaving out what both forms do alike (the query, latent and output projections)."""
    heads, latent, rope = args.num_attention_heads, args.kv_lora_rank, args.qk_rope_head_dim
    up = 2 * latent * heads * (args.qk_nope_head_dim + args.v_head_dim)  # a latent's keys and values, or a query's fold
    keys = cached + positions
    if absorbed:
        return positions * up + 2 * positions * keys * heads * (2 * latent + rope)
    return keys * up + 2 * positions * keys * heads * (args.qk_nope_head_dim + rope + args.v_head_dim)


def absorbed_pays(args: ModelArgs, positions: int, cached: int) -> bool:
    """Whether a prefill step of `positions` after `cached` ones attends in the absorbed form."""
    return positions > 1 and (attention_flops(args, positions, cached, True)
                              <= ABSORBED_SAVING * attention_flops(args, positions, cached, False))


class Attention(DeepseekV3Attention):
    def __call__(self, x: mx.array, mask: Optional[mx.array] = None, cache: Optional[Any] = None,
                 absorbed: bool = False) -> mx.array:
        B, L, _ = x.shape
        if not absorbed or L == 1:
            return super().__call__(x, mask, cache)
        if self.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.reshape(B, L, self.num_heads, self.q_head_dim).transpose(0, 2, 1, 3)
        q_nope, q_pe = mx.split(q, [self.qk_nope_head_dim], axis=-1)
        kv_latent, k_pe = mx.split(self.kv_a_proj_with_mqa(x), [self.kv_lora_rank], axis=-1)
        k_pe = k_pe.reshape(B, L, 1, self.qk_rope_head_dim).transpose(0, 2, 1, 3)
        kv_latent = mx.expand_dims(self.kv_a_layernorm(kv_latent), axis=1)
        offset = cache.offset if cache is not None else 0
        q_pe, k_pe = self.rope(q_pe, offset), self.rope(k_pe, offset)
        if cache is not None:
            kv_latent, k_pe = cache.update_and_fetch(kv_latent, k_pe)
        pe_scores = (q_pe * self.scale) @ k_pe.swapaxes(-1, -2)
        if mask is not None:
            pe_scores = mx.where(mask, pe_scores, mx.array(mx.finfo(pe_scores.dtype).min, pe_scores.dtype))
        out = scaled_dot_product_attention(self.embed_q(q_nope), kv_latent, kv_latent, cache=cache,
                                           scale=self.scale, mask=pe_scores)
        out = self.unembed_out(out).transpose(0, 2, 1, 3).reshape(B, L, -1)
        return self.o_proj(out)


class DecoderLayer(DeepseekV3DecoderLayer):
    """DeepseekV3DecoderLayer with the Attention above (the same parameters and names)."""

    def __init__(self, config: ModelArgs, layer_idx: int):
        super().__init__(config, layer_idx)
        # The same module, not a new one: building another would draw its initial weights again,
        # and change every checkpoint make-tiny generates from a seed.
        self.self_attn.__class__ = Attention

    def __call__(self, x: mx.array, mask: Optional[mx.array] = None, cache: Optional[Any] = None,
                 absorbed: bool = False) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), mask, cache, absorbed)
        return h + self.mlp(self.post_attention_layernorm(h))
