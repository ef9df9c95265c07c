"""Layer slices stitched together in one process reproduce mlx-lm's single-process model exactly,
hold exactly their own tensors, and read nothing of the other layers."""

import gc
import json
import shutil
import struct

import mlx.core as mx
import mlx_lm
import pytest
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.models.deepseek_v3 import ModelArgs

from mlx_kimi.builtin import BUILTIN_MODELS
from mlx_kimi.checkpoint import CheckpointError, open_checkpoint, tensor_part
from mlx_kimi.mla import absorbed_pays, attention_flops
from mlx_kimi.slice import LayerRange, load_slice
from mlx_kimi.tiny import TinyShape, make_tiny

PARTITIONS_6 = [
    [(0, 6)],
    [(0, 1), (1, 6)],
    [(0, 2), (2, 3), (3, 6)],
]
PARTITIONS_DSV3 = [[(0, 2), (2, 4)]]
GREEDY_TOKENS = 32


def _ids(partition):
    return "+".join(f"{a}-{b}" for a, b in partition)


@pytest.fixture(scope="module")
def ckpt(tiny_dir):
    return open_checkpoint(tiny_dir)


@pytest.fixture(scope="module")
def dsv3_ckpt(tiny_dsv3_dir):
    return open_checkpoint(tiny_dsv3_dir)


@pytest.fixture(scope="module")
def dsv3_oracle(tiny_dsv3_dir):
    return mlx_lm.load(str(tiny_dsv3_dir))


@pytest.fixture(scope="module")
def slice_sets(ckpt, dsv3_ckpt):
    """Every partition's slices, loaded once: (checkpoint name, partition) -> [ModelSlice]."""
    cache = {}

    def get(which, partition):
        checkpoint = {"k25": ckpt, "dsv3": dsv3_ckpt}[which]
        key = (which, tuple(partition))
        if key not in cache:
            cache[key] = [load_slice(checkpoint, LayerRange(a, b)) for a, b in partition]
        return cache[key]

    return get


def stitched_forward(slices, x, caches, absorbed=False):
    """Run the slices one after another, the way the pipeline hands hidden states on."""
    h = x
    for s, c in zip(slices, caches):
        h = s.forward(h, c, absorbed)
        mx.eval(h)  # a stage boundary: the next slice gets a materialized array
    return h


def stitched_generate(slices, prompt_ids, max_tokens):
    """Greedy generation over stitched slices, mirroring mlx_lm.generate.generate_step: prefill
    prompt[:-1] in one call, then the last prompt token, then each sampled token; the sample is
    argmax(logits - logsumexp(logits)) of the last position."""
    caches = [s.make_caches() for s in slices]
    prompt = mx.array(prompt_ids)
    if len(prompt_ids) > 1:
        stitched_forward(slices, prompt[:-1][None], caches)
    y = prompt[-1:]
    out = []
    for _ in range(max_tokens):
        logits = stitched_forward(slices, y[None], caches)[:, -1, :]
        logprobs = logits - mx.logsumexp(logits, keepdims=True)
        y = mx.argmax(logprobs, axis=-1)
        out.append(y.item())
    return out


# Exact equality (not allclose) is expected: a slice is built from the very mlx-lm modules
# (DeepseekV3DecoderLayer, whose attention and layer mlx_kimi/mla.py subclasses only to add the
# absorbed form of a speculative step, Embedding, RMSNorm, the quantized linears) that mlx-lm's model uses,
# loaded from the same bytes (the checkpoint's float dtype -- bf16 on the real models -- and the
# same packed 2/4-bit weights with their scales), and ModelSlice.forward performs the same ops in the
# same order (embed, the same array causal mask, each layer with its own KV cache, norm, lm_head).
# Splitting the layer loop into pieces only adds evaluation points between layers; on the same
# device that changes no arithmetic, so every logit must match bit for bit. Any difference
# means a slice computes something else (wrong weights, wrong layer indices, wrong mask or rope
# offset, a dropped norm).


@pytest.fixture(scope="module")
def k25_oracle_logits(oracle, chat_prompt_ids):
    logits = oracle[0](mx.array(chat_prompt_ids)[None])
    mx.eval(logits)
    return logits


@pytest.mark.parametrize("partition", PARTITIONS_6, ids=_ids)
def test_stitched_logits_equal_mlx_lm(partition, oracle, chat_prompt_ids, k25_oracle_logits, slice_sets):
    model, _ = oracle
    x = mx.array(chat_prompt_ids)[None]
    expected = k25_oracle_logits
    slices = slice_sets("k25", partition)
    got = stitched_forward(slices, x, [s.make_caches() for s in slices])
    assert got.shape == expected.shape == (1, len(chat_prompt_ids), model.args.text_config.vocab_size)
    assert got.dtype == expected.dtype
    assert mx.array_equal(got, expected).item()


@pytest.fixture(scope="module")
def k25_oracle_tokens(oracle, chat_prompt_ids, oracle_tokens):
    return oracle_tokens(oracle[0], chat_prompt_ids, GREEDY_TOKENS)


@pytest.mark.parametrize("partition", PARTITIONS_6, ids=_ids)
def test_stitched_greedy_tokens_equal_generate_step(partition, chat_prompt_ids, k25_oracle_tokens, slice_sets):
    assert len(k25_oracle_tokens) == GREEDY_TOKENS
    got = stitched_generate(slice_sets("k25", partition), chat_prompt_ids, GREEDY_TOKENS)
    assert got == k25_oracle_tokens


def test_a_speculative_step_attends_absorbed_and_gives_mlx_lm_decode_logits(oracle, chat_prompt_ids, slice_sets):
    """A step of several positions with `absorbed` (mla.py: MLA's decode form at any width, for a
    token and its draft) gives the logits mlx-lm's model computes for those positions one at a
    time, as its decode does; the prefill form gives them too: the two differ only in rounding."""
    model, _ = oracle
    prompt, step = chat_prompt_ids[:-5], chat_prompt_ids[-5:]
    cache = make_prompt_cache(model)
    model(mx.array(prompt)[None], cache=cache)
    expected = mx.concatenate([model(mx.array([[t]]), cache=cache) for t in step], axis=1)
    slices = slice_sets("k25", PARTITIONS_6[1])
    for absorbed in (True, False):
        caches = [s.make_caches() for s in slices]
        stitched_forward(slices, mx.array(prompt)[None], caches)
        got = stitched_forward(slices, mx.array(step)[None], caches, absorbed)
        assert got.shape == expected.shape
        assert mx.abs(got - expected).max().item() < 1e-4, absorbed
        assert mx.array_equal(got.argmax(-1), expected.argmax(-1)).item()
        assert [c.offset for c in caches[-1]] == [len(chat_prompt_ids)] * len(caches[-1])


def test_a_prefill_chunk_deep_in_the_context_holds_scores_and_the_up_projected_keys_and_values():
    """Measured on MLX: a prefill chunk's attention after N cached positions allocates a part that
    grows with chunk x context (the scores, prefill_scratch_bytes' second term) and a part that does
    not: K and V of every position up-projected from the latent (its third term, which the planner
    lacked; as large as the scores at the default 256-token chunk). bf16, like the real model. The
    first part is ~2.5 score matrices on MLX's CPU backend (its attention materialises the scores
    and their softmax), one where the attention is fused as on Metal: the plan counts one."""
    from mlx_lm.models.base import create_attention_mask
    from mlx_lm.models.cache import KVCache

    from cluster.planner import ATTENTION_SCORE_BYTES, prefill_scratch_bytes, sizes_for_model
    from mlx_kimi.mla import Attention

    # Kimi's heads' dimensions and latent; fewer heads, a narrower residual and a shorter context
    # than its own keep it quick (neither term depends on the residual's width)
    config = {**BUILTIN_MODELS["kimi-k2"], "num_attention_heads": 4, "num_hidden_layers": 1, "hidden_size": 512,
              "q_lora_rank": 256}
    args, cached = ModelArgs.from_dict(config), 4096
    mx.random.seed(0)
    attention = Attention(args)
    attention.set_dtype(mx.bfloat16)
    cache = KVCache()
    # one step of room past the cached positions, so the measured call never grows the cache
    cache.update_and_fetch(mx.random.normal((1, 1, cached + cache.step, args.kv_lora_rank)).astype(mx.bfloat16),
                           mx.random.normal((1, 1, cached + cache.step, args.qk_rope_head_dim)).astype(mx.bfloat16))
    cache.trim(cache.step)
    mx.eval(attention.parameters(), cache.state)

    def peak(chunk: int) -> int:
        x = (mx.random.normal((1, chunk, args.hidden_size)) * 0.1).astype(mx.bfloat16)
        mask = create_attention_mask(x, cache, return_array=True)
        mx.eval(x, mask)
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        mx.eval(attention(x, mask, cache))  # mlx-lm's prefill form
        cache.trim(chunk)
        return mx.get_peak_memory() - base

    peaks = {chunk: peak(chunk) for chunk in (16, 256)}
    per_chunk_token = (peaks[256] - peaks[16]) / 240
    independent = peaks[16] - 16 * per_chunk_token
    sizes = sizes_for_model([0], 0, 0, config)
    up_projected = (cached + 16) * sizes.up_projected_bytes_per_token
    score_row = (cached + 16) * args.num_attention_heads * ATTENTION_SCORE_BYTES
    print(f"peak above the inputs: {peaks[16] / 2**20:.1f} MiB (chunk 16), {peaks[256] / 2**20:.1f} MiB (256); "
          f"per chunk token {per_chunk_token / score_row:.2f} score rows, apart from the chunk "
          f"{independent / 2**20:.1f} MiB; K and V planned {up_projected / 2**20:.1f} MiB")
    assert 0.9 * up_projected <= independent <= 1.25 * up_projected
    assert per_chunk_token >= score_row  # MLX's CPU sdpa materialises more than one score matrix; Metal's fused one
    assert prefill_scratch_bytes(sizes, cached + 16, 16) >= up_projected + 16 * score_row


def test_a_short_chunk_deep_in_the_context_attends_absorbed_where_that_pays(oracle, chat_prompt_ids, slice_sets):
    """A prefill chunk picks MLA's form by its FLOPs (mla.absorbed_pays): for Kimi, an agent's
    short next turn after a long conversation goes absorbed (the prefill form would up-project all
    16k cached positions for 16 new ones); a prompt's first chunk and a long chunk keep mlx-lm's
    form. The slice's choice is the form it names: bit for bit, and mlx-lm's logits within rounding."""
    kimi = ModelArgs.from_dict(BUILTIN_MODELS["kimi-k2"])
    assert attention_flops(kimi, 1, 16383, absorbed=False) // 16384 >= 16_777_216  # per cached position
    assert absorbed_pays(kimi, 16, 16384) and absorbed_pays(kimi, 64, 4096)
    assert not absorbed_pays(kimi, 16, 0) and not absorbed_pays(kimi, 256, 16384) and not absorbed_pays(kimi, 1, 4096)
    model, _ = oracle
    prompt, turn = chat_prompt_ids[:-4], chat_prompt_ids[-4:]
    cache = make_prompt_cache(model)
    model(mx.array(prompt)[None], cache=cache)
    expected = model(mx.array(turn)[None], cache=cache)
    slices = slice_sets("k25", PARTITIONS_6[1])
    assert absorbed_pays(slices[0].args, len(turn), len(prompt)) and not absorbed_pays(slices[0].args, len(prompt), 0)
    got = {}
    for absorbed in (None, True, False):
        caches = [s.make_caches() for s in slices]
        first = stitched_forward(slices, mx.array(prompt)[None], caches, absorbed=None if absorbed is None else False)
        got[absorbed] = (first, stitched_forward(slices, mx.array(turn)[None], caches, absorbed))
    assert mx.array_equal(got[None][0], got[False][0]).item()  # the first chunk: mlx-lm's form
    assert mx.array_equal(got[None][1], got[True][1]).item()   # the short turn after it: absorbed
    assert mx.abs(got[None][1] - expected).max().item() < 1e-4
    assert mx.array_equal(got[None][1].argmax(-1), expected.argmax(-1)).item()


@pytest.mark.parametrize("partition", PARTITIONS_DSV3, ids=_ids)
def test_deepseek_v3_layout(partition, dsv3_oracle, dsv3_ckpt, oracle_tokens, make_chat_prompt, slice_sets):
    model, tokenizer = dsv3_oracle
    prompt_ids = make_chat_prompt(tokenizer)
    slices = slice_sets("dsv3", partition)
    for s, (a, b) in zip(slices, partition):
        assert s.nbytes() == dsv3_ckpt.sizes().range_bytes(a, b)

    x = mx.array(prompt_ids)[None]
    got = stitched_forward(slices, x, [s.make_caches() for s in slices])
    assert mx.array_equal(got, model(x)).item()

    expected = oracle_tokens(model, prompt_ids, GREEDY_TOKENS)
    assert stitched_generate(slices, prompt_ids, GREEDY_TOKENS) == expected


def test_bfloat16_checkpoint_stitched_logits_exact(tmp_path_factory, make_chat_prompt):
    """The real models run in bfloat16 (the tiny fixtures default to float32 for CPU speed):
    exactness must hold there too, where any reordering of ops would show in the low bits."""
    path = make_tiny(tmp_path_factory.mktemp("tiny_bf16") / "ckpt", TinyShape(layers=3), dtype="bfloat16")
    checkpoint = open_checkpoint(path)
    assert checkpoint.tensors["language_model.model.norm.weight"].dtype == "BF16"
    model, tokenizer = mlx_lm.load(str(path))
    x = mx.array(make_chat_prompt(tokenizer))[None]
    expected = model(x)
    assert expected.dtype == mx.bfloat16
    slices = [load_slice(checkpoint, LayerRange(i, i + 1)) for i in range(3)]
    got = stitched_forward(slices, x, [s.make_caches() for s in slices])
    assert got.dtype == mx.bfloat16
    assert mx.array_equal(got, expected).item()


@pytest.mark.parametrize("partition", PARTITIONS_6, ids=_ids)
def test_slice_holds_exactly_its_tensors(partition, ckpt, slice_sets):
    sizes = ckpt.sizes()
    slices = slice_sets("k25", partition)
    for s, (a, b) in zip(slices, partition):
        assert (s.layers.start, s.layers.end) == (a, b)
        assert s.nbytes() == sizes.range_bytes(a, b), (a, b)
    assert sum(s.nbytes() for s in slices) == sizes.total_bytes


def test_loading_a_slice_allocates_only_its_bytes(ckpt):
    """load_slice evaluates its weights (they are resident when it returns) and nothing else: the
    growth of MLX's active memory is the slice's bytes, far below the whole model's."""
    layers = LayerRange(2, 4)
    nbytes = ckpt.sizes().range_bytes(layers.start, layers.end)
    total = ckpt.sizes().total_bytes
    margin = 64 * 1024 + nbytes // 10
    assert nbytes + margin < total - nbytes  # the bound below tells the slice from the model

    gc.collect()
    mx.clear_cache()
    before = mx.get_active_memory()
    s = load_slice(ckpt, layers)
    grown = mx.get_active_memory() - before
    assert s.nbytes() == nbytes
    assert nbytes <= grown < nbytes + margin, (grown, nbytes, total)
    del s


def test_a_grown_slice_shares_the_layers_it_held_and_reads_only_the_others(ckpt):
    """A last stage taking its lost neighbour's layers (re-planning after a node is lost) keeps
    its layers and head in memory: MLX's active memory grows by the new layers only, and the
    grown slice computes exactly what a slice loaded afresh does."""
    held = load_slice(ckpt, LayerRange(4, 6))
    added = ckpt.sizes().range_bytes(2, 4)
    gc.collect()
    mx.clear_cache()
    before = mx.get_active_memory()
    grown = load_slice(ckpt, LayerRange(2, 6), reuse=held)
    growth = mx.get_active_memory() - before
    assert grown.nbytes() == ckpt.sizes().range_bytes(2, 6)
    assert added <= growth < added + 64 * 1024 + added // 10 < grown.nbytes(), (growth, added)
    fresh = load_slice(ckpt, LayerRange(2, 6))
    x = mx.random.normal((1, 5, grown.args.hidden_size)).astype(grown._backbone.layers[0].input_layernorm.weight.dtype)
    assert mx.array_equal(grown.forward(x, grown.make_caches()), fresh.forward(x, fresh.make_caches())).item()


def test_layer_range_rejects_empty_and_negative():
    for start, end in [(0, 0), (3, 3), (4, 2), (-1, 2), (-2, -1)]:
        with pytest.raises(ValueError, match="empty or negative"):
            LayerRange(start, end)
    r = LayerRange(1, 4)
    assert len(r) == 3 and str(r) == "[1, 4)"


def test_load_slice_beyond_model_layers(ckpt):
    with pytest.raises(CheckpointError) as e:
        load_slice(ckpt, LayerRange(4, 7))
    assert "[4, 7)" in str(e.value)
    assert "6 layers" in str(e.value)
    assert str(ckpt.path) in str(e.value)


# ---------------------------------------------------------------------------------------------
# A slice reads only its own tensors.
#
# We damage a copy of the checkpoint everywhere the slice must not look and check the slice
# still computes exactly what the pristine one does. Deleting the shard files the slice does not
# need would be the literal test, but open_checkpoint (rightly) refuses a checkpoint whose index
# names a missing file, and dropping those entries from the index would make the layers "missing"
# instead. So the files the slice does not need keep their header (open_checkpoint still accepts
# them) but every data byte becomes 0xFF (a NaN in bf16 / float32, garbage in the packed weights):
# reading any of it would poison the output. Inside the files the slice does need, the data of
# every tensor of another part (other layers, embedding, head) gets the same treatment.
# A control loads the damaged parts and checks the damage does show, so the test can fail.


def _header(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return 8 + n, header


def _poison(path, keep):
    """Overwrite with 0xFF the data of every tensor in `path` whose name is not in `keep`."""
    data_start, header = _header(path)
    poisoned = 0
    with open(path, "r+b") as f:
        for name, entry in header.items():
            if name in keep:
                continue
            begin, end = entry["data_offsets"]
            f.seek(data_start + begin)
            f.write(b"\xff" * (end - begin))
            poisoned += end - begin
    return poisoned


def _slice_input(checkpoint, layers, prompt_ids):
    """What the slice receives in the pipeline: token ids, or the pristine model's hidden state."""
    x = mx.array(prompt_ids)[None]
    if layers.start == 0:
        return x
    before = load_slice(checkpoint, LayerRange(0, layers.start))
    h = before.forward(x, before.make_caches())
    mx.eval(h)
    return h


@pytest.mark.parametrize("start,end", [(0, 1), (2, 3), (5, 6)])
def test_slice_reads_only_its_own_tensors(start, end, ckpt, chat_prompt_ids, tmp_path):
    prompt_ids = chat_prompt_ids[-8:]  # short: any poisoned weight the slice used would give NaN
    layers = LayerRange(start, end)
    damaged = tmp_path / "damaged"
    shutil.copytree(ckpt.path, damaged)

    own = {t.name for t in ckpt.slice_tensors(start, end)}
    own_files = {t.file for t in ckpt.tensors.values() if t.name in own}
    other_files = {t.file for t in ckpt.tensors.values()} - own_files
    assert other_files, "the slice should leave at least one shard file unused"
    poisoned = sum(_poison(damaged / f, keep=own) for f in sorted(own_files | other_files))
    assert poisoned == ckpt.sizes().total_bytes - ckpt.sizes().range_bytes(start, end)

    damaged_ckpt = open_checkpoint(damaged)
    assert damaged_ckpt.model_id == ckpt.model_id  # headers untouched

    x = _slice_input(ckpt, layers, prompt_ids)
    pristine = load_slice(ckpt, layers)
    expected = pristine.forward(x, pristine.make_caches())
    got_slice = load_slice(damaged_ckpt, layers)
    got = got_slice.forward(x, got_slice.make_caches())
    assert not mx.any(mx.isnan(got)).item()
    assert mx.array_equal(got, expected).item()

    # Control: the parts next to the slice (which lie in the files it reads) are really damaged.
    neighbour = LayerRange(end, end + 1) if end < ckpt.num_layers else LayerRange(start - 1, start)
    h = _slice_input(ckpt, neighbour, prompt_ids[-2:])
    bad = load_slice(damaged_ckpt, neighbour)
    assert mx.any(mx.isnan(bad.forward(h, bad.make_caches()))).item()


def test_tiny_checkpoint_spreads_layers_over_files(ckpt):
    """The read-only-its-own-tensors test relies on the layout: several parts per file, several files."""
    files = {}
    for t in ckpt.tensors.values():
        files.setdefault(t.file, set()).add(tensor_part(t.name, ckpt.prefix))
    assert len(files) == 3
    assert all(len(parts) >= 2 for parts in files.values())
