"""One KV pool per set of weights (``cache.KVPool``): every bucket, stream set and static/eager
runner of a ``Decoder`` works on views of it, so switching buckets and rule kinds keeps the
tokens of decoding alone; its size is reported and what will not fit is refused up front."""
import copy

import pytest
import torch
from conftest import aad_pick, naive_decode, random_lora, tiny_model

from aad_fast import AAD, CFG, OPAD, BeamAAD, Contrastive, Decoder, Greedy
from aad_fast.model import cache
from aad_fast.decode import steps as engine
from aad_fast.model.cache import KVPool, StaticKVCache

PROMPTS8 = [[1, 5, 6, 7, 8, 9], [1, 9], [1, 20, 21, 22], [1, 4], [1, 30, 31, 32, 33, 34, 35, 2],
            [1, 11, 12], [1, 40], [1, 7, 7, 8, 50, 51]]
PRINCIPLE = [30, 31, 32]
LAYERS, KV_HEADS, HEAD_DIM = 2, 2, 12  # conftest.tiny_config
argmax = lambda a, r, t, h: int(a.argmax())  # noqa: E731


@pytest.fixture(scope="module")
def models():
    return tiny_model("llama", 0), tiny_model("llama", 1)


@pytest.fixture(scope="module")
def lora():
    base = tiny_model("llama", 0)
    sft = copy.deepcopy(base)
    pm = random_lora(base)
    return pm, copy.deepcopy(pm).merge_and_unload().eval(), sft


def _graph_mode(dec, monkeypatch):
    """Graph-mode bookkeeping on CPU: buckets 1/2/4/8, static runners of max_seq_len slots,
    the capture refused (the step runs eagerly), as tests/test_generation.py does."""
    monkeypatch.setattr(engine, "try_capture", lambda *a, **k: None)
    dec.use_graphs = True
    return dec


def _poison(dec, seed):
    """Fill every KV pool with large finite noise: a runner that read a slot its own prefill,
    admission or step did not write would change its tokens."""
    g = torch.Generator().manual_seed(seed)
    with torch.inference_mode():  # the pool was made inside the decode's inference mode
        for pool in dec._pools.values():
            for t in pool.keys + pool.values:
                t.copy_(torch.randn(t.shape, generator=g) * 8)


def _storages(dec):
    """Distinct KV storages of every runner the Decoder keeps, with their bytes."""
    out = {}
    for pair in dec._runner_sets.values():
        for r in pair.runners:
            for t in r.cache.keys + r.cache.values:
                s = t.untyped_storage()
                out[s.data_ptr()] = s.nbytes()
    return out


def _run_sequence(dec, calls, expect, monkeypatch, mode):
    if mode == "graphs":
        _graph_mode(dec, monkeypatch)
    rows_seen = set()
    for i, (rule, n) in enumerate(calls):
        _poison(dec, i)
        got = dec.generate(input_ids=PROMPTS8[:n], rule=rule, max_new_tokens=7, stop=[])
        assert got.tokens == expect(rule, n), (i, rule, n)
        rows_seen.add(got.stats.get("rows", n))
        # every runner kept is a view of the pool: no KV memory besides it
        pools = {t.untyped_storage().data_ptr()
                 for p in dec._pools.values() for t in p.keys + p.values}
        assert set(_storages(dec)) <= pools
        assert sum(_storages(dec).values()) <= dec.kv_cache_bytes
    if mode == "graphs":
        assert {1, 8} <= rows_seen  # the buckets really switched


def _alone(make):
    """Tokens of each call decoded on a fresh Decoder (nothing decoded before it)."""
    memo = {}

    def expect(rule, n):
        key = (repr(rule), n)
        if key not in memo:
            memo[key] = make().generate(input_ids=PROMPTS8[:n], rule=rule, max_new_tokens=7,
                                        stop=[]).tokens
        return memo[key]
    return expect


CALLS = [(AAD(0.2), 1), (AAD(0.2), 8), (Greedy("a"), 1), (Greedy("r"), 8),
         (BeamAAD(num_beams=2, alpha=0.2), 3), (Contrastive(0.1, 0.5), 1), (AAD(0.3), 5),
         (Greedy("r"), 1), (AAD(0.2), 1)]


@pytest.mark.parametrize("mode", ["eager", "graphs"])
def test_two_model_pair_bucket_and_kind_switches_equal_decoding_alone(models, monkeypatch,
                                                                     mode):
    make = lambda: Decoder(*models, max_batch_size=8, max_seq_len=48)  # noqa: E731
    expect = _alone(make)
    _run_sequence(make(), CALLS, expect, monkeypatch, mode)
    assert expect(AAD(0.2), 8) == naive_decode(aad_pick(0.2), models, PROMPTS8, 7, stops=())
    assert expect(Greedy("r"), 8) == naive_decode(argmax, models[1:], PROMPTS8, 7, stops=())


@pytest.mark.parametrize("mode", ["eager", "graphs"])
def test_lora_pair_bucket_and_kind_switches_equal_decoding_alone(lora, monkeypatch, mode):
    pm, merged, sft = lora
    make = lambda: Decoder(pm, max_batch_size=8, max_seq_len=48)  # noqa: E731
    expect = _alone(make)
    _run_sequence(make(), CALLS, expect, monkeypatch, mode)
    assert expect(AAD(0.2), 8) == naive_decode(aad_pick(0.2), (merged, sft), PROMPTS8, 7,
                                               stops=())
    assert expect(Greedy("a"), 1) == naive_decode(argmax, (merged,), PROMPTS8[:1], 7, stops=())


@pytest.mark.parametrize("mode", ["eager", "graphs"])
def test_prompt_pair_bucket_and_kind_switches_equal_decoding_alone(models, monkeypatch, mode):
    opad, cfg = OPAD(1.0, principle_ids=PRINCIPLE), CFG(1.5, negative_ids=[1])
    calls = [(opad, 1), (cfg, 8), (Greedy("a"), 1), (opad, 8), (Greedy("a"), 3), (cfg, 1)]
    make = lambda: Decoder(models[0], max_batch_size=8, max_seq_len=48)  # noqa: E731
    _run_sequence(make(), calls, _alone(make), monkeypatch, mode)


def test_kv_cache_bytes_is_the_pool_formula_and_what_is_allocated(models, lora, monkeypatch):
    per_row = 2 * LAYERS * KV_HEADS * 48 * HEAD_DIM * 4  # keys + values, fp32
    two = _graph_mode(Decoder(*models, max_batch_size=4, max_seq_len=48), monkeypatch)
    assert two.kv_cache_bytes == 2 * 4 * per_row  # two models, 4 rows each, before any use
    for n, rule in ((1, AAD(0.1)), (2, Greedy("r")), (4, AAD(0.1)), (1, Greedy("a"))):
        got = two.generate(input_ids=PROMPTS8[:n], rule=rule, max_new_tokens=4)
        assert got.stats["kv_cache_bytes"] == 2 * 4 * per_row
    held = sum(t.numel() * t.element_size()
               for p in two._pools.values() for t in p.keys + p.values)
    assert held == 2 * 4 * per_row
    assert len(two._runner_sets) >= 3  # buckets 1, 2, 4 kept, all on the one pool
    assert sum(_storages(two).values()) == held
    shared = Decoder(lora[0], max_batch_size=4, max_seq_len=48)
    assert shared.kv_cache_bytes == 2 * 4 * per_row  # one set of weights, 2 x 4 rows
    got = shared.generate(input_ids=PROMPTS8[:3], rule=AAD(0.1), max_new_tokens=4)
    assert got.stats["kv_cache_bytes"] == 2 * 4 * per_row
    assert cache.kv_bytes(models[0], 3, 10) == 3 * per_row * 10 // 48


def test_a_pool_that_does_not_fit_is_refused_up_front(models, monkeypatch):
    need = 2 * 2 * LAYERS * 4 * KV_HEADS * 64 * HEAD_DIM * 4
    monkeypatch.setattr(cache, "available_bytes", lambda device: need - 1)
    with pytest.raises(ValueError, match=r"max_batch_size=4 and max_seq_len=64 needs "
                                         rf"{need} bytes .* has {need - 1} bytes"):
        Decoder(*models, max_batch_size=4, max_seq_len=64)
    monkeypatch.setattr(cache, "available_bytes", lambda device: need)
    dec = Decoder(*models, max_batch_size=4, max_seq_len=64)  # exactly fits
    monkeypatch.setattr(cache, "available_bytes", lambda device: need // 4)
    with pytest.raises(ValueError, match=rf"scheduler's KV cache for rows=2 and max_seq_len=64 "
                                         rf"needs {need // 2} bytes"):
        dec.scheduler(AAD(0.1), rows=2)  # two models x 2 rows: half the Decoder's pools
    greedy = dec.scheduler(Greedy("r"), rows=2)  # one model's pool of 2 rows: a quarter, fits
    (runner,) = greedy.pair.runners
    assert runner.pool.rows == 2 and runner.pool.nbytes == need // 4
    assert runner.pool is not dec._pools["r"]  # its own: its rows stay live between calls


def test_available_bytes_reads_meminfo_on_cpu():
    import os
    if not os.path.exists("/proc/meminfo"):
        assert cache.available_bytes("cpu") is None
        return
    with open("/proc/meminfo") as f:
        line = next(line for line in f if line.startswith("MemAvailable:"))
    got = cache.available_bytes("cpu")
    assert abs(got - int(line.split()[1]) * 1024) < 2**30  # (it moves between the two reads)


def test_pool_views_share_storage_and_start_zeroed():
    pool = KVPool(rows=4, max_len=10)
    k1 = torch.randn(1, 2, 3, 5)
    v1 = torch.randn(1, 2, 3, 7)
    big_k, big_v = pool.view(0, 4, 10, k1, v1)
    assert big_k.shape == (4, 2, 10, 5) and big_v.shape == (4, 2, 10, 7)
    assert big_k.is_contiguous() and not big_k.any() and not big_v.any()
    big_k.fill_(3.0)
    small_k, _ = pool.view(0, 1, 10, k1, v1)  # the first row of the full view
    assert small_k.data_ptr() == big_k.data_ptr() and bool((small_k == 3.0).all())
    short_k, _ = pool.view(0, 2, 4, k1, v1)  # a prefix of the flat buffer, contiguous
    assert short_k.shape == (2, 2, 4, 5) and short_k.is_contiguous()
    assert pool.nbytes == 4 * 2 * 10 * (5 + 7) * 4
    with pytest.raises(ValueError, match="5 rows x 10 slots does not fit this KV pool of 4 rows"):
        pool.view(0, 5, 10, k1, v1)
    with pytest.raises(ValueError, match="layer 0: keys/values of 2 heads x 6/7"):
        pool.view(0, 1, 10, torch.randn(1, 2, 3, 6), v1)
    cache_ = StaticKVCache(10, pool, 2)
    cache_.write_pos = torch.arange(3)
    k, v = cache_.update(k1.expand(2, -1, -1, -1), v1.expand(2, -1, -1, -1), 0)
    assert k.data_ptr() == big_k.data_ptr() and torch.equal(k[1, :, :3], k1[0])
