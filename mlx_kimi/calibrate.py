"""Streamed calibration: a calibration set flows through the model one decoder layer at a time.

Each layer's master weights are read from the source (dequantized from FP8, INT4 or bf16 by
convert's readers) as they are needed: the attention block's few modules together, then the MLP
one unit at a time (the dense MLP, the shared experts, each routed expert on the tokens the router
sends it). For every quantizable module the pass can

- measure, at each candidate bits / group size, the squared error its round-to-nearest
  quantization alone adds to the layer's output (relative to the layer output's norm), times its
  block's gain: the sensitivities `--fit` spends its budget by (`measure`);
- quantize it at the chosen bits, with GPTQ when `gptq` is on and enough calibration tokens reached
  it (its Hessian from exactly those inputs), and hand the arrays to convert's shard writer
  (`blocks`).

The layer's QUANTIZED output is what the next layer receives, so errors compound as in the real
model. After each part the hidden states are saved in OUT/.calibration, so an interrupted pass
resumes at the next part.

A layer-local error cannot see what the layers after it do to it, so `measure` also carries
amplification streams on the first STREAM_TOKENS tokens of the calibration set: the float model's
hidden states, and one copy per block (the embedding, each layer's attention, each layer's MLP) in
which only that block ran quantized at PASS_ON, every later layer in float from the master weights
the pass reads anyway. At lm_head each stream's KL divergence from the float one is that block's
effect on the model's output; over the block's own local error (measured like the modules', on the
float stream) it is the block's gain, and every module's errors are multiplied by its block's gain
(lm_head's gain: its own KL over its logits' error). The gains go to the quality card.

Peak memory above the idle process, whatever the number of experts (peak_bytes_bound):
  32 MB
  + hidden states  ~ 16 x tokens x hidden_size x 4 bytes
  + one unit     ~ 3 x its float32 bytes (the attention block, or the three weights of one MLP
                   or expert, or a row block of the embedding / lm_head)
  + one Hessian  = in_features^2 x 4 bytes (and its inverse factor)
  + while measuring, the streams  ~ 3 x (2 x layers + 2) x STREAM_TOKENS x hidden_size x 4 bytes
For Kimi K2 with 1024 calibration tokens: 0.47 GB + 3 x 1.6 GB (layer 0's dense MLP) + 2 x 1.4 GB
+ 3 x 124 x 128 x 7168 x 4 (1.4 GB), about 9.5 GB. The streams cost the measuring pass about 8x the
float forward compute of its main stream (sum over layers l of (2l + 3) x 128 tokens against 61 x 1024)
and, saved after each part for resuming, up to 0.45 GB of disk a part (about 14 GB at the end of 61
layers), deleted when the conversion finishes.
"""

import dataclasses
import hashlib
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.deepseek_v3 import DeepseekV3Attention, group_expert_select
from mlx_lm.quant.gptq import Catcher

from .convert import produce, quantized_arrays, row_step
from .gptq import ModuleInputs, gptq_quantize, rtn_dequantized, squares, sum_squares
from .checkpoint import text_config
from .calibration_state import PartStore
from .quality_card import CARD_FILE, bits_label, build_card, read_card, write_card
from .recipe import CANDIDATES
from .slice import model_args
from .sources import decode_rows, int4_rows, native_int4, source_rows

GPTQ_MIN_TOKENS = 32  # fewer inputs than this and a module's Hessian says too little: round to nearest
PASS_ON = (3, 64)  # while measuring, each layer is passed on quantized at this candidate
STREAM_TOKENS = 128  # tokens (of the first calibration sequence) the amplification streams carry

def peak_bytes_bound(config: dict, tokens: int, chunk_bytes: int) -> int:
    """What the streamed pass may hold above the idle process (the module docstring's formula): it
    depends on one layer's dimensions and the calibration set, not on the number of layers or experts."""
    t = text_config(config)
    hidden, heads = t["hidden_size"], t["num_attention_heads"]
    q_head = t["qk_nope_head_dim"] + t["qk_rope_head_dim"]
    rank = t.get("q_lora_rank")
    q = hidden * rank + rank * heads * q_head if rank else hidden * heads * q_head
    attention = (q + hidden * (t["kv_lora_rank"] + t["qk_rope_head_dim"]) + heads * t["v_head_dim"] * hidden
                 + t["kv_lora_rank"] * heads * (t["qk_nope_head_dim"] + t["v_head_dim"]))
    widest = max(t["intermediate_size"], t["moe_intermediate_size"] * max(1, t.get("n_shared_experts") or 1))
    unit = 4 * max(attention, 3 * hidden * widest, chunk_bytes // 4)
    hessian = 4 * max(hidden, widest, heads * t["v_head_dim"]) ** 2
    streams = 3 * stream_count(t["num_hidden_layers"]) * min(tokens, STREAM_TOKENS) * hidden * 4
    return 32 * 2**20 + 16 * tokens * hidden * 4 + 3 * unit + 2 * hessian + streams


def stream_count(layers: int) -> int:
    """The measuring pass's streams at their most: the float one, and one per block (embedding, each
    layer's attention and MLP) quantized alone."""
    return 2 * layers + 2


def block_labels(layers: list) -> list:
    """The blocks the amplification streams stand for, in the order they are made."""
    return ["embedding"] + [f"{i}.{kind}" for i in layers for kind in ("attention", "mlp")] + ["lm_head"]


def block_of(part, module: str) -> str:
    if part == "embed":
        return "embedding"
    if part == "head":
        return "lm_head"
    return f"{part}.{'attention' if '.self_attn.' in module else 'mlp'}"


def swiglu(w: dict, x: mx.array) -> mx.array:
    return (nn.silu(x @ w["gate"].T) * (x @ w["up"].T)) @ w["down"].T


class StreamKL:
    """Mean KL divergence from a reference next-token distribution (logits z) to others (logits y), the
    logits given a block of the vocabulary at a time: each distribution's normalizer (logsumexp) is
    accumulated as the blocks come, and the reference's probabilities rescaled to it."""

    def __init__(self):
        self.lse = None  # (T,) the reference's logsumexp so far
        self.kl, self.lse_y = [], []  # per group of others: (k, T) sum p (z - y), and their logsumexp

    def add(self, z: mx.array, groups: list) -> None:
        """z (T, rows); groups: functions giving the others' logits (k, T, rows), a few at a time."""
        chunk = mx.logsumexp(z, axis=-1)
        lse = chunk if self.lse is None else mx.logaddexp(self.lse, chunk)
        p = mx.exp(z - lse[:, None])
        for g, logits in enumerate(groups):
            y = logits()
            kl, lse_y = (p * (z - y)).sum(-1), mx.logsumexp(y, axis=-1)
            if self.lse is None:
                self.kl.append(kl)
                self.lse_y.append(lse_y)
            else:
                self.kl[g] = self.kl[g] * mx.exp(self.lse - lse) + kl
                self.lse_y[g] = mx.logaddexp(self.lse_y[g], lse_y)
            mx.eval(self.kl[g], self.lse_y[g])
        self.lse = lse
        mx.eval(self.lse)

    def means(self) -> list:
        kl, lse_y = mx.concatenate(self.kl), mx.concatenate(self.lse_y)
        return (kl - self.lse + lse_y).mean(-1).tolist()


# --- the pieces of one layer ----------------------------------------------------------------------

@dataclasses.dataclass
class Written:
    """One module's quantized arrays as they go to the shard, and the float32 weight they stand for."""

    arrays: list
    weight: mx.array
    gptq: bool


class Calibration:
    """The streamed pass over one source with one calibration set."""

    def __init__(self, source, ids: mx.array, work: Path, gptq: bool = True, chunk_bytes: int = 256 * 2**20):
        self.source = source
        self.ids = ids
        self.store = PartStore(work)
        self.gptq = gptq
        self.chunk_bytes = chunk_bytes
        self.args = model_args(source.config)
        self.prefix = source.prefix
        self.mask = create_attention_mask(mx.zeros((1, ids.shape[1], 1)), None, return_array=True) \
            if ids.shape[1] > 1 else None
        self.cards = {}  # part -> its quality card entry
        self.stream_tokens = min(STREAM_TOKENS, ids.shape[1])
        self.stream_mask = create_attention_mask(mx.zeros((1, self.stream_tokens, 1)), None, return_array=True) \
            if self.stream_tokens > 1 else None
        self.stream_group = max(1, ids.size // self.stream_tokens)  # streams run together: the main pass's size
        self.amplification = None  # block -> {"output_kl", "local_error", "gain"}, once measured
        self._hidden = None  # hidden states after the part last run or restored
        self._streams = None  # while measuring: (streams, T, hidden), the float one first
        self._hidden_part = None  # (stage, that part)
        self._order = []

    @property
    def ids_digest(self) -> str:
        return hashlib.sha256(np.array(self.ids).tobytes()).hexdigest()[:16]

    @property
    def key(self) -> str:
        """What the quantized shards depend on besides source and recipe."""
        return f"{'gptq' if self.gptq else 'rtn'}:{self.ids_digest}:{GPTQ_MIN_TOKENS}"

    # --- reading master weights ---

    def master(self, target, expert: int = None) -> mx.array:
        """A target's master weight in float32 (one expert of a stacked one)."""
        if expert is not None:
            name = target.sources[expert]
            return decode_rows(self.source, name, 0, source_rows(self.source, name)).astype(mx.float32)
        if target.name.endswith("e_score_correction_bias"):
            return self.source.tensors[target.sources[0]].read().astype(mx.float32)
        blocks = [a[0] for _, a in produce(self.source, dataclasses.replace(target, quant=None), mx.float32,
                                             self.chunk_bytes)]
        return (mx.concatenate(blocks) if len(blocks) > 1 else blocks[0]).astype(mx.float32)

    def quantize(self, target, w: mx.array, quant, dtype, inputs: ModuleInputs = None, expert: int = None) -> Written:
        """The arrays the shard gets for `w` (exactly convert's own for round to nearest), GPTQ'd on the
        module's inputs when on and enough of them reached it."""
        name = target.sources[expert if expert is not None else 0]
        if quant and native_int4(self.source, name, quant):
            arrays = list(int4_rows(self.source, name, 0, source_rows(self.source, name), dtype))
            return Written(arrays, w, False)
        if quant and self.gptq and inputs is not None and inputs.tokens >= GPTQ_MIN_TOKENS and w.ndim == 2:
            packed, scales, biases = gptq_quantize(w, inputs.factor(), quant["bits"], quant["group_size"])
            arrays = [packed, scales.astype(dtype), biases.astype(dtype)]
            used = True
        else:
            arrays = quantized_arrays(w.astype(dtype), dataclasses.replace(target, quant=quant), dtype)
            used = False
        if quant:
            flat = [a.reshape(-1, a.shape[-1]) for a in arrays]
            weight = mx.dequantize(*flat, group_size=quant["group_size"], bits=quant["bits"]).reshape(w.shape)
        else:
            weight = arrays[0]
        return Written(arrays, weight.astype(mx.float32), used)

    # --- the parts ---

    def run_part(self, part, targets: list, dtype, choose, candidates: bool):
        """Run one part on the hidden states the previous part left; yields (target index, row, arrays) to
        write when `choose` gives the quant of each target (`candidates`: also measure every candidate's
        error, returned in the card under "errors")."""
        by_name = {t.name: k for k, t in enumerate(targets)}
        written = set()
        card = {"part": part, "errors": {}, "bits": {}, "gptq": 0}

        def emit(target, row, arrays):
            written.add(target.name)
            return by_name[target.name], row, arrays

        if part == "embed":
            self._embed(targets, dtype, choose, candidates, card)
            gen = iter(())
        elif part == "head":
            gen = self._head(targets, dtype, choose, candidates, card, emit)
        else:
            gen = self._layer(part, targets, dtype, choose, candidates, card, emit)
        yield from gen
        for k, t in enumerate(targets):
            if t.name not in written:
                for row, arrays in produce(self.source, t, dtype, self.chunk_bytes):
                    yield k, row, arrays
        return card

    def _embed(self, targets, dtype, choose, candidates, card):
        t = targets[0]
        ids = self.ids.reshape(-1)
        rows = mx.concatenate([decode_rows(self.source, t.sources[0], i, i + 1) for i in ids.tolist()])
        rows = rows.astype(mx.float32)
        quant = choose(t)
        if candidates:
            total = sum_squares(rows)
            card["errors"][t.module] = self._candidates(t, lambda c: squares(rtn_dequantized(rows, c) - rows) / total)
        q = rtn_dequantized(rows.astype(dtype).astype(mx.float32), (quant["bits"], quant["group_size"]) if quant else None)
        card["bits"]["embedding"] = [bits_label(quant)]
        card["output_error"] = {"embedding": (sum_squares(q - rows) / sum_squares(rows)) ** 0.5}
        self._hidden = q.reshape(*self.ids.shape, -1)
        if candidates:
            clean = rows.reshape(*self.ids.shape, -1)[:1, : self.stream_tokens]
            perturbed = rtn_dequantized(clean, self.reference(t))
            self._streams = mx.concatenate([clean, perturbed])
            card["local"] = {"embedding": sum_squares(perturbed - clean) / sum_squares(clean)}

    def valid_candidates(self, target) -> list:
        """The candidates the target can take (a native INT4 source: none above 4 bits, nor float)."""
        native = native_int4(self.source, target.sources[0], {"bits": 4, "group_size": 32})
        return [c for c in CANDIDATES if (c is None or target.shape[-1] % c[1] == 0)
                and not (native and (c is None or c[0] > 4))]

    def reference(self, target):
        """The candidate a module's effect is measured at (PASS_ON where valid)."""
        quantized = [c for c in self.valid_candidates(target) if c is not None]
        return PASS_ON if PASS_ON in quantized else quantized[0]

    def _candidates(self, target, error) -> dict:
        """{candidate: error(candidate)} over the valid candidates (0 for float, and for native INT4 at
        4-bit g32, which is lossless), evaluated one at a time: each holds a quantized copy of the
        unit while it runs, and all at once would hold one per candidate."""
        native = native_int4(self.source, target.sources[0], {"bits": 4, "group_size": 32})
        return {c: 0.0 if c is None or (native and c == (4, 32)) else float(error(c))
                for c in self.valid_candidates(target)}

    def _head(self, targets, dtype, choose, candidates, card, emit):
        by = {t.name[len(self.prefix):]: t for t in targets}
        norm, head = by["model.norm.weight"], by["lm_head.weight"]
        x = mx.fast.rms_norm(self._hidden, self.master(norm), self.args.rms_norm_eps).reshape(-1, self.args.hidden_size)
        quant = choose(head)
        errors, total, err = {}, 0.0, 0.0
        rows = head.shape[0]
        step = row_step(rows, head.shape[-1], self.chunk_bytes)
        used, inputs = False, ModuleInputs(x)  # one factor for every row block
        if candidates:
            xs = mx.fast.rms_norm(self._streams, self.master(norm), self.args.rms_norm_eps)
            kl, local, total_s = StreamKL(), 0.0, 0.0
        for r in range(0, rows, step):
            w = decode_rows(self.source, head.sources[0], r, min(rows, r + step)).astype(mx.float32)
            logits = x @ w.T
            total += sum_squares(logits)
            if candidates:
                for c, e in self._candidates(head, lambda c: squares(x @ (rtn_dequantized(w, c) - w).T)).items():
                    errors[c] = errors.get(c, 0.0) + e
            out = self.quantize(head, w, quant, dtype, inputs)
            used |= out.gptq
            err += sum_squares(x @ (out.weight - w).T)
            if candidates:  # every stream through the float head, and the float one through this quantized
                z, wq = xs[0] @ w.T, rtn_dequantized(w, self.reference(head))
                groups = [lambda k=k: xs[k: k + self.stream_group] @ w.T
                          for k in range(1, xs.shape[0], self.stream_group)]
                kl.add(z, groups + [lambda: (xs[0] @ wq.T)[None]])
                total_s += sum_squares(z)
                local += sum_squares(xs[0] @ (wq - w).T)
            yield emit(head, r, out.arrays)
        if candidates:
            card["errors"][head.module] = {c: e / total for c, e in errors.items()}
            card["local"] = {"lm_head": local / total_s}
            card["output_kl"] = kl.means()
        card["gptq"] += used
        card["bits"]["lm_head"] = [bits_label(quant)]
        card["output_error"] = {"lm_head": (err / total) ** 0.5}

    def _layer(self, i, targets, dtype, choose, candidates, card, emit):
        layer = f"{self.prefix}model.layers.{i}."
        by = {t.name[len(layer):]: t for t in targets}
        eps = self.args.rms_norm_eps
        x = self._hidden
        errors = {}  # module -> {candidate: squared error of the layer output}

        # attention: the block's modules held together, master and quantized
        norm = self.master(by["input_layernorm.weight"])
        xn = mx.fast.rms_norm(x, norm, eps)
        attn = DeepseekV3Attention(self.args)
        attention = {k[len("self_attn."):]: t for k, t in by.items() if k.startswith("self_attn.")}
        master = {k: self.master(t) for k, t in attention.items()}
        attn.load_weights(list(master.items()), strict=False)
        linear = [k[: -len(".weight")] for k, t in attention.items() if t.quantizable
                  and isinstance(getattr(attn, k[: -len(".weight")]), nn.Linear)]
        for name in linear:
            setattr(attn, name, Catcher(getattr(attn, name)))
        a_master = attn(xn, self.mask)
        mx.eval(a_master)
        inputs = {name: getattr(attn, name).H for name in linear}
        for name in linear:
            setattr(attn, name, getattr(attn, name).module)
        streams = self._streams if candidates else None
        if streams is not None:
            sn = mx.fast.rms_norm(streams, norm, eps)
            a_streams = mx.concatenate([attn(sn[k: k + self.stream_group], self.stream_mask)
                                        for k in range(0, sn.shape[0], self.stream_group)])
            mx.eval(a_streams)
        quantized = {}
        for key, t in attention.items():
            if not t.quantizable:
                continue
            module, w = key[: -len(".weight")], master[key]
            if candidates:
                errors[t.module] = self._attention_errors(attn, module, t, w, xn, a_master, inputs.get(module))
            caught = inputs.get(module)
            out = self.quantize(t, w, choose(t), dtype,
                                None if caught is None else ModuleInputs(hessian=caught, tokens=self.ids.size))
            card["gptq"] += out.gptq
            quantized[module] = out.weight
            yield emit(t, 0, out.arrays)
        for module, w in quantized.items():
            getattr(attn, module).weight = w
        a_quant = attn(xn, self.mask)
        mx.eval(a_quant)
        if streams is not None:  # the float stream through this quantized attention: one stream more
            a_clean = attn(sn[:1], self.stream_mask)
            streams = mx.concatenate([streams + a_streams, streams[:1] + a_clean])
            local = {"attention": a_clean - a_streams[:1]}
            mx.eval(streams)
            del sn, a_streams
        del attn, master, quantized
        kinds = {"attention": (a_master, a_quant)}
        card["bits"]["attention"] = sorted({bits_label(choose(t)) for t in attention.values() if t.quantizable})

        # MLP: one unit (dense MLP, shared experts, one routed expert) at a time, on the same input
        h = x + a_quant
        post_norm = self.master(by["post_attention_layernorm.weight"])
        hn = mx.fast.rms_norm(h, post_norm, eps)
        flat = hn.reshape(-1, hn.shape[-1])
        if streams is not None:
            flat_s = mx.fast.rms_norm(streams, post_norm, eps).reshape(-1, hn.shape[-1])
            y_streams, y_clean = mx.zeros_like(flat_s), mx.zeros((self.stream_tokens, flat.shape[-1]))
        if "mlp.gate.weight" in by:
            gate = self.master(by["mlp.gate.weight"])
            bias = self.master(by["mlp.gate.e_score_correction_bias"])
            a = self.args

            def route(tokens):
                inds, scores = group_expert_select(tokens @ gate.T, bias, a.num_experts_per_tok, a.n_group,
                                                   a.topk_group, a.routed_scaling_factor, a.norm_topk_prob)
                return np.array(inds), np.array(scores.astype(mx.float32))

            inds, scores = route(flat)
            if streams is not None:
                stream_inds, stream_scores = route(flat_s)
            mlps = {"experts": [("mlp.switch_mlp.", e) for e in range(a.n_routed_experts)]}
            if "mlp.shared_experts.gate_proj.weight" in by:
                mlps["shared_experts"] = [("mlp.shared_experts.", None)]
        else:
            mlps = {"mlp": [("mlp.", None)]}
        card["never_routed"], card["rtn_experts"] = [], []
        for kind, units in mlps.items():
            y_master, y_quant = mx.zeros_like(flat), mx.zeros_like(flat)
            for base, expert in units:
                if expert is None:
                    tokens, weight = mx.arange(flat.shape[0]), None
                else:
                    rows, slots = np.nonzero(inds == expert)
                    if not len(rows):
                        card["never_routed"].append(expert)
                    tokens, weight = mx.array(rows), mx.array(scores[rows, slots])[:, None]
                mods = {p: by[f"{base}{p}_proj.weight"] for p in ("gate", "up", "down")}
                out = yield from self._mlp_unit(mods, flat[tokens], weight, expert, dtype, choose, candidates,
                                                errors, emit)
                if expert is not None and len(rows) and not out["gptq"] and self.gptq:
                    card["rtn_experts"].append(expert)
                card["gptq"] += out["gptq"]
                if len(tokens):
                    y_master = y_master.at[tokens].add(out["master"])
                    y_quant = y_quant.at[tokens].add(out["quant"])
                mx.eval(y_master, y_quant)
                if streams is not None:
                    if expert is None:
                        rows, gains = np.arange(flat_s.shape[0]), np.ones((flat_s.shape[0], 1), np.float32)
                    else:
                        rows, slots = np.nonzero(stream_inds == expert)
                        gains = stream_scores[rows, slots][:, None]
                    y_streams, y_clean = self._stream_unit(out, flat_s, rows, gains, y_streams, y_clean)
                del out  # and its unit's weights before the next unit's are read
            kinds[kind] = (y_master, y_quant)
            card["bits"][kind] = sorted({bits_label(choose(t)) for t in mods.values()})
        mlp_master = sum(m for k, (m, _) in kinds.items() if k != "attention").reshape(x.shape)
        mlp_quant = sum(q for k, (_, q) in kinds.items() if k != "attention").reshape(x.shape)
        card["output_error"] = {k: (sum_squares(q - m) / max(sum_squares(m), 1e-30)) ** 0.5 for k, (m, q) in kinds.items()}
        sub_master, sub_quant = a_master + mlp_master, a_quant + mlp_quant
        card["output_error"]["layer"] = (sum_squares(sub_quant - sub_master) / max(sum_squares(sub_master), 1e-30)) ** 0.5
        self._hidden = h + mlp_quant
        mx.eval(self._hidden)
        if streams is not None:
            mlp_float = y_streams[: self.stream_tokens]
            streams = mx.concatenate([streams + y_streams.reshape(streams.shape), streams[:1] + y_clean[None]])
            local["mlp"] = y_clean - mlp_float
            out_norm = max(sum_squares(streams[0]), 1e-30)
            card["local"] = {k: sum_squares(d) / out_norm for k, d in local.items()}
            self._streams = streams
            mx.eval(self._streams)
        if candidates:
            scale = max(sum_squares(x + sub_master), 1e-30)
            card["errors"] = {m: {c: e / scale for c, e in cands.items()} for m, cands in errors.items()}

    def _attention_errors(self, attn, module, target, w, xn, a_master, hessian) -> dict:
        """A module's effect on the attention output, run at one candidate (PASS_ON if valid) and scaled
        to the others by its own output error on its inputs (trace(dW H dW^T) with H = X^T X, or, for
        the per-head modules, its weight error): one attention run per module, not one per candidate."""
        reference = self.reference(target)

        def own(c):
            d = rtn_dequantized(w, c) - w
            return ((d @ hessian) * d).sum() if hessian is not None else squares(d)

        getattr(attn, module).weight = rtn_dequantized(w, reference)
        effect = squares(attn(xn, self.mask) - a_master)
        getattr(attn, module).weight = w
        scale = effect / mx.maximum(own(reference), 1e-30)
        return self._candidates(target, lambda c: scale * own(c))

    def _stream_unit(self, unit, flat, rows, gains, y_streams, y_clean) -> tuple:
        """An MLP unit's outputs added for the streams' tokens it gets (rows of flat, router weights gains):
        every stream's through the float unit, the float stream's (its first rows) also through the
        quantized one."""
        if len(rows):
            y_streams = y_streams.at[mx.array(rows)].add(swiglu(unit["weights"], flat[mx.array(rows)]) * mx.array(gains))
            clean = rows < self.stream_tokens
            if clean.any():
                picked = mx.array(rows[clean])
                y_clean = y_clean.at[picked].add(swiglu(unit["quantized"], flat[picked]) * mx.array(gains[clean]))
            mx.eval(y_streams, y_clean)
        return y_streams, y_clean

    def _mlp_unit(self, mods, x, weight, expert, dtype, choose, candidates, errors, emit):
        """One MLP (gate, up, down) on its tokens x, scaled by the router's weight: master and quantized
        outputs; GPTQ for gate and up on x, for down on the quantized gate and up's activations."""
        w = {p: self.master(t, expert) for p, t in mods.items()}
        scale = (lambda y: y * weight) if weight is not None else (lambda y: y)

        g, u = x @ w["gate"].T, x @ w["up"].T
        act = nn.silu(g) * u
        y_master = scale(act @ w["down"].T)
        if candidates:
            effects = {"gate": lambda c: (nn.silu(x @ rtn_dequantized(w["gate"], c).T) * u - act) @ w["down"].T,
                       "up": lambda c: (nn.silu(g) * (x @ (rtn_dequantized(w["up"], c) - w["up"]).T)) @ w["down"].T,
                       "down": lambda c: act @ (rtn_dequantized(w["down"], c) - w["down"]).T}
            for p, t in mods.items():
                for c, e in self._candidates(t, lambda c, p=p: squares(scale(effects[p](c)))).items():
                    errors.setdefault(t.module, {}).setdefault(c, 0.0)
                    errors[t.module][c] += e
        rows = mods["gate"].shape[-2] if expert is not None else 0
        down_rows = mods["down"].shape[-2] if expert is not None else 0
        gate_up = ModuleInputs(x)
        gate = self.quantize(mods["gate"], w["gate"], choose(mods["gate"]), dtype, gate_up, expert)
        up = self.quantize(mods["up"], w["up"], choose(mods["up"]), dtype, gate_up, expert)
        act_quant = nn.silu(x @ gate.weight.T) * (x @ up.weight.T)
        down = self.quantize(mods["down"], w["down"], choose(mods["down"]), dtype, ModuleInputs(act_quant), expert)
        base = expert or 0
        yield emit(mods["gate"], base * rows, gate.arrays)
        yield emit(mods["up"], base * rows, up.arrays)
        yield emit(mods["down"], base * down_rows, down.arrays)
        y_quant = scale(act_quant @ down.weight.T)
        mx.eval(y_master, y_quant)
        return {"master": y_master, "quant": y_quant, "gptq": gate.gptq + up.gptq + down.gptq, "weights": w,
                "quantized": {"gate": gate.weight, "up": up.weight, "down": down.weight}}

    # --- state between parts and runs ---

    def restore(self, stage: str, part) -> None:
        """The hidden states (and card) after `part`, from memory or from a previous run's files."""
        if self._hidden_part != (stage, part):
            self._hidden, self.cards[part], self._streams = self.store.load(stage, part, stage == "measure")
            self._hidden_part = (stage, part)

    def save(self, stage: str, part, card: dict) -> None:
        self.store.save(stage, part, self._hidden, card, self._streams if stage == "measure" else None)
        self.cards[part] = card
        self._hidden_part = (stage, part)

    def _stage(self, stage: str, part, targets, dtype, choose, candidates: bool):
        order = self._order
        previous = order[order.index(part) - 1] if part != "embed" else None
        if previous is not None:
            self.restore(stage, previous)
        card = yield from self.run_part(part, targets, dtype, choose, candidates)
        self.save(stage, part, card)

    def start(self, parts: dict) -> None:
        self._order = ["embed"] + sorted(p for p in parts if isinstance(p, int)) + ["head"]

    # --- the two passes ---

    def measure(self, parts: dict, dtype) -> dict:
        """module -> {candidate: measured error}, streaming every part with each layer passed on quantized
        at PASS_ON (round to nearest), each error times its block's gain (amplify); resumes from
        OUT/.calibration/measure."""
        self.start(parts)
        stage = self._fresh("measure")
        table = {}
        pass_on = {"bits": PASS_ON[0], "group_size": PASS_ON[1]}

        def choose(t):
            return pass_on if t.quantizable and t.shape[-1] % PASS_ON[1] == 0 else None

        gptq, self.gptq = self.gptq, False
        try:
            for part in self._order:
                if self.store.has(stage, part):
                    self.cards[part] = self.store.card(stage, part)
                else:
                    for _ in self._stage(stage, part, parts[part], dtype, choose, True):
                        pass
                table.update(self.cards[part]["errors"])
        finally:
            self.gptq = gptq
            self._streams = None
        return self.amplify(table)

    def amplify(self, table: dict) -> dict:
        """The layer-local errors scaled to the model's output: each block's (embedding, a layer's attention
        or MLP, lm_head) gain is the KL its quantization alone at the reference candidate added to the
        float stream's next-token distributions, over the local error it made there."""
        cards = self.cards
        local = {**cards["embed"]["local"], **cards["head"]["local"]}
        for part in self._order[1:-1]:
            local.update({f"{part}.{kind}": e for kind, e in cards[part]["local"].items()})
        labels = block_labels(self._order[1:-1])
        kl = dict(zip(labels, cards["head"]["output_kl"]))
        self.amplification = {b: {"output_kl": kl[b], "local_error": local[b], "gain": kl[b] / max(local[b], 1e-30)}
                              for b in labels}
        blocks = {m: block_of(part, m) for part in self._order for m in cards[part]["errors"]}
        return {m: {c: e * self.amplification[blocks[m]]["gain"] for c, e in cands.items()}
                for m, cands in table.items()}

    def blocks(self, part, targets: list, dtype):
        """convert's writer input for one part: (target index, row, arrays), each module quantized at
        its plan's bits (GPTQ when on), the card and hidden states saved when the part is done."""
        yield from self._stage(self._fresh("quantize"), part, targets, dtype, lambda t: t.quant, False)

    def _fresh(self, stage: str) -> str:
        measured = f"{self.ids_digest}:streams{self.stream_tokens}"
        return self.store.fresh(stage, {"source": self.source.identity(),
                                        "calibration": self.key if stage == "quantize" else measured})

    def finish(self, out) -> dict:
        """Write OUT/quality.json from every part's entry (a rerun that wrote nothing keeps the card it
        finds) and drop the hidden states."""
        for part in self._order:
            if part not in self.cards and self.store.has("quantize", part):
                self.cards[part] = self.store.card("quantize", part)
        if len(self.cards) < len(self._order) and (Path(out) / CARD_FILE).exists():
            return read_card(out)
        entries = [{k: v for k, v in self.cards[p].items() if k != "errors"} for p in self._order if p in self.cards]
        card = build_card(entries, {"tokens": int(self.ids.size), "sequences": int(self.ids.shape[0]),
                                    "gptq": self.gptq, "gptq_min_tokens": GPTQ_MIN_TOKENS})
        if self.amplification:
            card["amplification"] = self.amplification
        write_card(out, card)
        self.store.drop_hidden("quantize")
        self.store.drop_hidden("measure", "*-streams.npy")
        return card

