"""Slice parts over real gRPC between in-process servers: only the slice's bytes travel, every chunk
is checked, a cut transfer resumes with the chunks it lacks, a corrupt chunk is fetched again,
and a corrupt cached part is found before it is loaded."""

import shutil
import mlx.core as mx
import pytest

from cluster.generated import kimi_cluster_pb2 as pb
from cluster.transfer import SliceFetcher, SliceStore, Source, TransferError, add_slices_service
from cluster.wire import decode_chunk, encode_chunk, make_server, open_channel
from mlx_kimi.checkpoint import open_checkpoint, tensor_part
from mlx_kimi.slice import LayerRange, load_slice
from mlx_kimi.slice_cache import SliceCache, part_name, slice_parts

SECRET = b"transfer-test-secret-0123456789"
CHUNK = 64 * 1024


class Server:
    """A node's Slices service on loopback, serving a whole checkpoint and/or its cache."""

    def __init__(self, cache_dir, checkpoints=()):
        self.store = SliceStore(SliceCache(cache_dir), checkpoints, chunk_bytes=CHUNK)
        self.server, port = make_server("127.0.0.1", 0, SECRET, "node")
        add_slices_service(self.server, self.store)
        self.address = f"127.0.0.1:{port}"
        self.server.start()

    def source(self) -> Source:
        return Source(self.address, open_channel(self.address, SECRET))


@pytest.fixture
def coordinator(tiny_dir, tmp_path):
    server = Server(tmp_path / "coord-cache", [open_checkpoint(tiny_dir)])
    yield server
    server.server.stop(0)


def _data_bytes(checkpoint, names):
    return sum(t.nbytes for t in checkpoint.tensors.values()
               if part_name(tensor_part(t.name, checkpoint.prefix)) in names)


def test_a_node_receives_exactly_its_slice_and_loads_it(tiny_dir, tmp_path, coordinator):
    source = open_checkpoint(tiny_dir)
    n = source.num_layers
    store = SliceStore(SliceCache(tmp_path / "worker"))
    fetcher = SliceFetcher(store, SECRET)
    checkpoint, received = fetcher.checkpoint(source.model_id, 1, n, [coordinator.address])
    names = slice_parts(1, n, n)
    slice_bytes = _data_bytes(source, names)
    assert received.received_bytes == slice_bytes == fetcher.received
    assert received.source == f"received from {coordinator.address}"
    on_disk = sum(f.stat().st_size for f in (tmp_path / "worker").rglob("*") if f.is_file())
    assert slice_bytes <= on_disk <= slice_bytes * 1.01 + 64 * 1024  # the slice plus headers and manifests
    assert sorted(p.stem for p in checkpoint.path.glob("*.safetensors")) == sorted(names)
    assert "embed" not in names and all(store.cache.verify(source.model_id, p) is None for p in names)

    layers = LayerRange(1, n)
    fetched, original = load_slice(checkpoint, layers), load_slice(source, layers)
    x = mx.random.normal((1, 3, fetched.args.hidden_size), key=mx.random.key(0)).astype(mx.float32)
    assert mx.array_equal(fetched.forward(x, fetched.make_caches()), original.forward(x, original.make_caches()))

    again = SliceFetcher(store, SECRET)
    _, held = again.checkpoint(source.model_id, 1, n, [coordinator.address])
    assert (held.source, held.received_bytes) == ("from its cache", 0)
    # A re-plan that moves one layer fetches only that layer.
    moved = SliceFetcher(store, SECRET)
    moved.checkpoint(source.model_id, 0, n, [coordinator.address])
    assert moved.received == _data_bytes(source, ["embed", "layer-0000"])


def test_a_cut_transfer_resumes_with_the_chunks_it_lacks(tiny_dir, tmp_path, coordinator):
    source = open_checkpoint(tiny_dir)
    part = "layer-0001"
    src = coordinator.source()
    manifest = SliceFetcher(SliceStore(SliceCache(tmp_path / "x")), SECRET)._ask(source.model_id, [part], [src])[part][0].parts[part]
    assert len(manifest.chunks) >= 4
    cache = SliceCache(tmp_path / "worker")
    cache.add_model(source.model_id, source.name, source.config)
    # The network goes away after three chunks.
    call = src.stub.FetchPart(pb.FetchPartRequest(model_id=source.model_id, part=part), timeout=30)
    with cache.receiving(source.model_id, manifest) as writer:
        for chunk in call:
            assert writer.write(chunk.index, chunk.data)
            if len(writer.missing) == len(manifest.chunks) - 3:
                call.cancel()
                break
    kept = manifest.chunk_span(2)[1]
    fetcher = SliceFetcher(SliceStore(cache), SECRET)
    fetcher.checkpoint(source.model_id, 1, 2, [coordinator.address])
    assert fetcher.received == manifest.data_bytes - kept
    assert cache.verify(source.model_id, part) is None


def test_a_corrupt_chunk_is_fetched_again_and_twice_is_named(tiny_dir, tmp_path):
    good = Server(tmp_path / "good-cache", [open_checkpoint(tiny_dir)])
    copy = tmp_path / "copy"
    shutil.copytree(tiny_dir, copy)
    bad = Server(tmp_path / "bad-cache", [open_checkpoint(copy)])
    try:
        model_id = open_checkpoint(tiny_dir).model_id
        part = "layer-0002"
        bad_source, good_source = bad.source(), good.source()
        fetcher = SliceFetcher(SliceStore(SliceCache(tmp_path / "worker")), SECRET)
        fetcher.store.cache.add_model(model_id, "tiny", open_checkpoint(tiny_dir).config)
        manifest = fetcher._ask(model_id, [part], [bad_source, good_source])[part][0].parts[part]
        # The bad node's disk flips a byte of the part after it made its manifest.
        position = manifest.chunk_span(1)[0] + 5  # in the part's data
        for path, offset, nbytes in bad.store.reader(model_id, part).segments:
            if position < nbytes:
                break
            position -= nbytes
        with open(path, "r+b") as f:
            f.seek(offset + position)
            byte = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([byte[0] ^ 0xFF]))

        fetcher.fetch_part(model_id, manifest, [bad_source, good_source])
        assert fetcher.received == manifest.data_bytes + CHUNK  # the bad chunk came twice
        assert fetcher.store.cache.verify(model_id, part) is None

        alone = SliceFetcher(SliceStore(SliceCache(tmp_path / "worker2")), SECRET)
        alone.store.cache.add_model(model_id, "tiny", open_checkpoint(tiny_dir).config)
        with pytest.raises(TransferError, match=rf"checksum mismatch twice: chunk 1 of {part} \(from {bad.address}"):
            alone.fetch_part(model_id, manifest, [bad_source])
    finally:
        good.server.stop(0)
        bad.server.stop(0)


def test_a_corrupt_cached_part_is_found_at_load_and_fetched_again(tiny_dir, tmp_path, coordinator):
    source = open_checkpoint(tiny_dir)
    store = SliceStore(SliceCache(tmp_path / "worker"))
    checkpoint, _ = SliceFetcher(store, SECRET).checkpoint(source.model_id, 2, 3, [coordinator.address])
    path = checkpoint.path / "layer-0002.safetensors"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0x01
    path.write_bytes(bytes(data))
    assert "fails its sha256" in store.cache.verify(source.model_id, "layer-0002")
    # A node growing from layer 2 (held in memory: its part is not read, so not checked) to [2, 4)
    # receives layer 3 only; the damage is found once layer 2 would be read from the cache again.
    grown = SliceFetcher(store, SECRET)
    grown.checkpoint(source.model_id, 2, 4, [coordinator.address], in_memory=(2, 3))
    assert grown.received == source.sizes().layer_bytes[3]
    again = SliceFetcher(store, SECRET)
    again.checkpoint(source.model_id, 2, 3, [coordinator.address])
    assert again.received == source.sizes().layer_bytes[2]
    assert store.cache.verify(source.model_id, "layer-0002") is None


def test_a_peer_serves_the_parts_of_its_cache(tiny_dir, tmp_path, coordinator):
    source = open_checkpoint(tiny_dir)
    peer = Server(tmp_path / "peer-cache")
    try:
        SliceFetcher(peer.store, SECRET).checkpoint(source.model_id, 1, 3, [coordinator.address])
        coordinator.server.stop(0)  # only the peer is left
        fetcher = SliceFetcher(SliceStore(SliceCache(tmp_path / "worker")), SECRET)
        _, received = fetcher.checkpoint(source.model_id, 2, 3, [coordinator.address, peer.address])
        assert received.source == f"received from {peer.address}"
        assert received.received_bytes == source.sizes().layer_bytes[2]
    finally:
        peer.server.stop(0)


def test_a_part_two_nodes_hold_comes_in_different_chunks_from_each(tiny_dir, tmp_path, coordinator):
    source = open_checkpoint(tiny_dir)
    peer = Server(tmp_path / "peer-cache")
    try:
        SliceFetcher(peer.store, SECRET).checkpoint(source.model_id, 1, 2, [coordinator.address])
        fetcher = SliceFetcher(SliceStore(SliceCache(tmp_path / "worker")), SECRET)
        _, received = fetcher.checkpoint(source.model_id, 1, 2, [coordinator.address, peer.address])
        part = source.sizes().layer_bytes[1]
        assert len(fetcher.received_from) == 2 and all(n > 0 for n in fetcher.received_from.values())
        assert received.received_bytes == sum(fetcher.received_from.values()) == part  # no chunk twice
        assert received.source == f"received from {', '.join(sorted([coordinator.address, peer.address]))}"
        assert fetcher.store.cache.verify(source.model_id, "layer-0001") is None
    finally:
        peer.server.stop(0)


def test_parts_load_while_the_rest_of_the_slice_arrives(tiny_dir, tmp_path, coordinator):
    source = open_checkpoint(tiny_dir)
    n = source.num_layers
    layers = LayerRange(0, n)
    # Received at a held rate, so the slice takes two seconds to arrive.
    fetcher = SliceFetcher(SliceStore(SliceCache(tmp_path / "worker")), SECRET,
                           max_rate=_data_bytes(source, slice_parts(0, n, n)) / 2)
    receiving = fetcher.receive(source.model_id, 0, n, [coordinator.address])
    arrived_when_loaded = []
    fetched = load_slice(receiving.checkpoint, layers, lambda done, total: arrived_when_loaded.append(receiving.finished()),
                         ready=receiving.ready)
    assert receiving.result().received_bytes == fetcher.received == _data_bytes(source, slice_parts(0, n, n))
    assert arrived_when_loaded[0] is False and arrived_when_loaded[-1] is True  # the first part loaded early
    original = load_slice(source, layers)
    tokens = mx.array([[1, 2, 3]])
    assert mx.array_equal(fetched.forward(tokens, fetched.make_caches()), original.forward(tokens, original.make_caches()))


@pytest.mark.parametrize("index", [0, 1, 300, 2**32 - 1])
def test_a_chunk_travels_as_the_part_chunk_protobuf_would_write(index):
    data = bytes(range(256)) * 3
    raw = pb.PartChunk(index=index, data=data).SerializeToString()
    assert encode_chunk(index, data) == raw
    decoded = decode_chunk(raw)
    assert decoded[0] == index and bytes(decoded[1]) == data
    # Fields in another order (any protobuf writer may) still decode; what is no PartChunk does not.
    data_field = encode_chunk(0, data)
    swapped = data_field + raw[:len(raw) - len(data_field)]
    assert (decode_chunk(swapped)[0], bytes(decode_chunk(swapped)[1])) == (index, data)
    assert decode_chunk(b"\x12\xff") == (-1, b"")


def test_a_model_no_source_holds_is_named(tmp_path, coordinator):
    fetcher = SliceFetcher(SliceStore(SliceCache(tmp_path / "worker")), SECRET)
    with pytest.raises(TransferError, match="no source holds model"):
        fetcher.checkpoint("0" * 64, 0, 1, [coordinator.address])


def test_a_part_received_whole_but_not_yet_put_in_place_is_not_sent_again(tiny_dir, tmp_path, coordinator):
    source = open_checkpoint(tiny_dir)
    part = "layer-0001"
    src = coordinator.source()
    cache = SliceCache(tmp_path / "worker")
    cache.add_model(source.model_id, source.name, source.config)
    manifest = SliceFetcher(SliceStore(cache), SECRET)._ask(source.model_id, [part], [src])[part][0].parts[part]
    with cache.receiving(source.model_id, manifest) as writer:  # killed before complete()
        for chunk in src.stub.FetchPart(pb.FetchPartRequest(model_id=source.model_id, part=part), timeout=30):
            assert writer.write(chunk.index, chunk.data)
    fetcher = SliceFetcher(SliceStore(cache), SECRET)
    fetcher.checkpoint(source.model_id, 1, 2, [coordinator.address])
    assert fetcher.received == 0
    assert cache.verify(source.model_id, part) is None


def test_parts_a_node_holds_in_some_shards_are_read_locally_once_they_match(tiny_dir, tmp_path, coordinator):
    """`--model-dir` with only some shards (e.g. `kimi-cluster download --layers`): the parts whose
    tensors are all there and match the source's manifest never travel; a part whose copy differs does."""
    source = open_checkpoint(tiny_dir)
    n = source.num_layers
    shard = sorted(tiny_dir.glob("*.safetensors"))[1].name
    partial = tmp_path / "partial"
    partial.mkdir()
    for f in tiny_dir.iterdir():
        if not f.name.endswith(".safetensors") or f.name == shard:
            shutil.copy(f, partial / f.name)
    local = sorted({part_name(tensor_part(t.name, source.prefix)) for t in source.tensors.values() if t.file == shard}
                   - {part_name(tensor_part(t.name, source.prefix)) for t in source.tensors.values() if t.file != shard})
    assert local, "the middle shard holds whole layers"
    names = slice_parts(0, n, n)
    fetcher = SliceFetcher(SliceStore(SliceCache(tmp_path / "worker"), local_dirs=[partial]), SECRET)
    checkpoint, received = fetcher.checkpoint(source.model_id, 0, n, [coordinator.address])
    assert received.received_bytes == _data_bytes(source, names) - _data_bytes(source, local)
    assert received.source == (f"read {len(local)} parts from {partial}; received from {coordinator.address}")
    assert all(fetcher.store.cache.verify(source.model_id, p) is None for p in names)

    # The same shard with one byte changed: that part is received instead.
    data = bytearray((partial / shard).read_bytes())
    data[-7] ^= 0x40
    (partial / shard).write_bytes(bytes(data))
    again = SliceFetcher(SliceStore(SliceCache(tmp_path / "worker2"), local_dirs=[partial]), SECRET)
    _, received = again.checkpoint(source.model_id, 0, n, [coordinator.address])
    assert received.received_bytes > _data_bytes(source, names) - _data_bytes(source, local)
    assert all(again.store.cache.verify(source.model_id, p) is None for p in names)


def test_load_bars_show_receiving_then_loading_per_node():
    import io
    from types import SimpleNamespace

    from rich.console import Console

    from cluster.load_progress import LoadBars

    out = io.StringIO()
    plan = SimpleNamespace(stages=[SimpleNamespace(node="a", weight_bytes=100), SimpleNamespace(node="b", weight_bytes=100)])
    bars = LoadBars(SimpleNamespace(plan=plan), Console(file=out, width=120, force_terminal=False))
    def shown(node):
        task = bars.progress.tasks[list(bars.tasks).index(node)]
        return task.description, task.completed, task.total

    bars("a", pb.LoadProgress(bytes_done=40, bytes_total=300, phase="transfer"))
    assert shown("a") == ("receiving a", 40, 300) and shown("b") == ("loading b", 0, 100)
    bars("a", pb.LoadProgress(bytes_done=300, bytes_total=300, phase="transfer"))
    bars("a", pb.LoadProgress(bytes_done=30, bytes_total=100, phase="load"))
    assert shown("a") == ("loading a", 30, 100)  # a new bar (and rate) for the load
    bars("a", pb.LoadProgress(bytes_done=100, bytes_total=100, phase="load", done=True))
    assert out.getvalue() == ""  # b is still to come: finishing a's transfer ended nothing
    bars("b", pb.LoadProgress(bytes_done=100, bytes_total=100, phase="load", done=True))
    lines = out.getvalue().splitlines()
    assert [line.split()[:2] for line in lines] == [["loading", "a"], ["loading", "b"]], lines
    assert bars.progress is None  # the round ended with both nodes done
