"""The few-row CPU linear layout and the measurement that chooses it (``cpu_linear``, ``tuning``):
same product as ``F.linear`` (fp32, another summation order), used only where chosen, chosen
only when measured faster, cached per machine, forced by the switch."""
import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from aad_fast import AAD, Decoder, Greedy, tuning
from aad_fast.model import cpu_linear
from aad_fast.model.cpu_linear import FewRowLinear, PackedLinear, few_row_linear, packed_linear
from conftest import aad_pick, naive_decode, tiny_model
from aad_fast.model import threads

PROMPTS = [[5, 9, 2], [7, 7, 30, 4, 11]]


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("AAD_FAST_TUNE_CACHE", str(tmp_path / "tuning.json"))
    monkeypatch.delenv("AAD_FAST_CPU_LINEAR", raising=False)
    monkeypatch.delenv("AAD_FAST_CPU_FEW_ROW_LINEAR", raising=False)
    tuning.forget()
    yield
    tuning.forget()


@pytest.mark.parametrize("shape", [(1, 192), (1, 1, 192), (2, 1, 192), (3, 192), (4, 4, 192),
                                   (33, 192), (5, 40, 192)])
@pytest.mark.parametrize("bias", [True, False])
def test_same_product_as_f_linear(shape, bias):
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(320, 192, generator=g), torch.randn(320, generator=g) if bias else None
    x = torch.randn(shape, generator=g)
    got = few_row_linear(x, w, b)
    assert got.shape == shape[:-1] + (320,) and got.is_contiguous()
    # fp32 with another summation order: a few ulps of sums of ~200 terms of size ~1
    torch.testing.assert_close(got, F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    xs = torch.randn(shape[:-1] + (384,), generator=g)[..., ::2]  # a strided input
    torch.testing.assert_close(few_row_linear(xs, w, b), F.linear(xs, w, b), rtol=1e-5, atol=1e-5)


def test_few_row_module_takes_its_path_up_to_max_rows_only(monkeypatch):
    calls = []
    real = cpu_linear.few_row_linear
    monkeypatch.setattr(cpu_linear, "few_row_linear",
                        lambda *a: calls.append(a[0].shape) or real(*a))
    lin = nn.Linear(16, 8)
    mod = FewRowLinear(lin, max_rows=4)
    assert mod.weight is lin.weight and mod.bias is lin.bias  # shared, not copied
    for rows, took in ((1, True), (4, True), (5, False), (2 * 3, False)):
        x = torch.randn(rows, 1, 16)
        torch.testing.assert_close(mod(x), lin(x), rtol=1e-5, atol=1e-5)
        assert (len(calls) == 1) == took, rows
        calls.clear()


def _fake(plain, few):
    seen = []

    def measure(weights, rows):
        seen.append((tuple(weights[0].shape), rows))
        return {"plain": plain, "few_row": few}
    return measure, seen


def test_measurement_chooses_the_faster_and_plain_within_noise():
    net = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 16))
    slower, _ = _fake(1.0, 2.0)
    assert {r["choice"] for r in cpu_linear.plan_linears(net, 2, measure=slower).values()} == {"plain"}
    faster, seen = _fake(1.0, 0.5)
    plan = cpu_linear.plan_linears(net, 3, measure=faster)
    assert {r["choice"] for r in plan.values()} == {"few_row"}
    assert sorted(seen) == [((16, 8), 3), ((16, 16), 3)]  # one measurement per distinct shape
    noise, _ = _fake(1.0, 1.0 - tuning.MARGIN / 2)
    assert {r["choice"] for r in cpu_linear.plan_linears(net, 4, measure=noise).values()} == {"plain"}


def test_choices_are_cached_per_machine_and_invalidated_by_a_version_change(monkeypatch):
    net = nn.Sequential(nn.Linear(8, 16))
    first, seen = _fake(1.0, 0.5)
    assert cpu_linear.plan_linears(net, 2, measure=first)[(16, 8)]["source"] == "measured"
    tuning.forget()  # a new process: only the file is left
    again, seen2 = _fake(1.0, 2.0)
    rec = cpu_linear.plan_linears(net, 2, measure=again)[(16, 8)]
    assert seen2 == [] and rec["choice"] == "few_row" and rec["source"] == "cache"
    tuning.forget()
    other = dict(tuning.machine(), torch="9.9.9")
    monkeypatch.setattr(tuning, "machine", lambda: other)
    rec = cpu_linear.plan_linears(net, 2, measure=again)[(16, 8)]
    assert seen2 == [((16, 8), 2)] and rec["choice"] == "plain" and rec["source"] == "measured"


def test_a_corrupt_cache_file_is_measured_again(tmp_path):
    (tmp_path / "tuning.json").write_text("{not json")
    measure, seen = _fake(1.0, 0.5)
    assert cpu_linear.plan_linears(nn.Linear(4, 4), 1, measure=measure)[(4, 4)]["choice"] == "few_row"
    assert seen == [((4, 4), 1)]


def test_switch_forces_each_path_without_measuring(monkeypatch):
    net = nn.Sequential(nn.Linear(8, 16))
    boom, seen = _fake(1.0, 1.0)
    for mode in ("plain", "few_row") + (("packed",) if cpu_linear.packed_supported() else ()):
        assert cpu_linear.plan_linears(net, 2, mode, measure=boom)[(16, 8)] == {
            "choice": mode, "source": "forced"}
    monkeypatch.setenv("AAD_FAST_CPU_FEW_ROW_LINEAR", "0")  # the older switch
    assert cpu_linear.plan_linears(net, 2, measure=boom)[(16, 8)]["choice"] == "plain"
    monkeypatch.setenv("AAD_FAST_CPU_LINEAR", "few_row")
    assert cpu_linear.plan_linears(net, 2, measure=boom)[(16, 8)]["choice"] == "few_row"
    assert seen == []
    with pytest.raises(ValueError, match="cpu_linear.*'fast'"):
        cpu_linear.linear_mode("fast")
    with pytest.raises(ValueError, match="cpu_linear"):
        Decoder(tiny_model(), cpu_linear="fast")


def test_only_fp32_cpu_plain_linears_have_a_choice():
    class MyLinear(nn.Linear):
        pass
    net = nn.Sequential(MyLinear(8, 8), nn.Linear(8, 12), nn.Linear(12, 4).to(torch.bfloat16))
    measure, seen = _fake(1.0, 0.5)
    assert list(cpu_linear.plan_linears(net, 2, measure=measure)) == [(12, 8)]


@pytest.mark.parametrize("layout", ["plain", "few_row", "packed", "auto"])
def test_decoder_tokens_equal_the_naive_loop_with_each_layout(layout):
    from peft import LoraConfig, get_peft_model
    ma, mr = tiny_model("llama", 0), tiny_model("llama", 1)
    want = naive_decode(aad_pick(0.1), (ma, mr), PROMPTS, 10)
    dec = Decoder(ma, mr, max_batch_size=2, max_seq_len=40, cpu_linear=layout)
    out = dec.generate(input_ids=PROMPTS, rule=AAD(0.1), max_new_tokens=10)
    assert out.tokens == want
    assert out.stats["linear"] and all(v.startswith(layout if layout != "auto" else "")
                                       for v in out.stats["linear"].values())
    base = tiny_model("llama", 2)
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                         init_lora_weights=False)).eval()
    merged = copy.deepcopy(pm).merge_and_unload().eval()
    dec = Decoder(pm, max_batch_size=2, max_seq_len=40, cpu_linear=layout)
    assert dec.generate(input_ids=PROMPTS, rule=AAD(0.1), max_new_tokens=10).tokens == \
        naive_decode(aad_pick(0.1), (merged, base), PROMPTS, 10)
    argmax = lambda a, r, t, h: int(a.argmax())  # noqa: E731
    assert dec.generate(input_ids=PROMPTS, rule=Greedy("r"), max_new_tokens=6).tokens == \
        naive_decode(argmax, (base,), PROMPTS, 6)


def test_default_backend_is_the_measured_fastest():
    from aad_fast.ops import backends
    cpu = torch.device("cpu")
    fake = lambda times: (lambda device, cands: {c: times[c] for c in cands})  # noqa: E731
    assert backends.fastest_backend(cpu, ["cpp", "torch"], fake({"cpp": 0.1, "torch": 1.0})) == "cpp"
    tuning.forget()
    (tuning.cache_path()).unlink()
    assert backends.fastest_backend(cpu, ["cpp", "torch"], fake({"cpp": 2.0, "torch": 1.0})) == \
        "torch"  # the plain path wins when the other is slower
    # cached: another measurement is not made
    assert backends.fastest_backend(cpu, ["cpp", "torch"], lambda *a: 1 / 0) == "torch"
    tuning.forget()
    (tuning.cache_path()).unlink()
    if "cpp" in backends.available_backends("cpu"):  # the real measurement on this machine
        assert backends.pick_backend(cpu, None) in ("cpp", "torch")
        assert tuning.cached("backend/cpu/cpp+torch")["ms"].keys() == {"cpp", "torch"}
    assert backends.pick_backend(cpu, "torch") == "torch"  # forced: no measurement needed


def test_a_busy_machine_keeps_plain_and_caches_nothing():
    """Rounds that scatter (other work on the machine) say nothing about the layouts: the plain
    path is used and the measurement is not written to the cache file."""
    net = nn.Sequential(nn.Linear(8, 16))
    seen = []

    def busy(weights, rows):
        seen.append(rows)
        return {"plain": 1.0, "few_row": 0.1, "stable": False}
    rec = cpu_linear.plan_linears(net, 2, measure=busy)[(16, 8)]
    assert rec["choice"] == "plain" and not rec["stable"]
    cpu_linear.plan_linears(net, 2, measure=busy)
    assert seen == [2]  # remembered for this process
    tuning.forget()     # a new process measures again: nothing was cached
    cpu_linear.plan_linears(net, 2, measure=busy)
    assert seen == [2, 2]
    times = tuning.time_rounds({"a": lambda: None, "b": lambda: None}, rounds=7, budget_s=0)
    assert set(times) == {"a", "b"} and all(len(t) == tuning.MIN_ROUNDS for t in times.values())


def test_time_candidates_flags_scattered_rounds(monkeypatch):
    fake = {"a": [1.0, 1.0, 1.1, 1.0, 1.0], "b": [1.0, 3.0, 3.0, 3.0, 1.0]}
    monkeypatch.setattr(tuning, "time_rounds", lambda fns, *a, **k: fake)
    out = tuning.time_candidates({"a": None, "b": None})
    assert out == {"a": 1.0, "b": 1.0, "stable": False}
    fake["b"] = [1.2, 1.0, 1.1, 1.3, 1.0]
    assert tuning.time_candidates({"a": None, "b": None})["stable"] is True


@pytest.mark.parametrize("whole_step_plain,want_few", [(1.0, False), (10.0, True)])
def test_the_whole_step_confirms_a_per_shape_plan(monkeypatch, whole_step_plain, want_few):
    """Per-shape timings that say few-row are checked on the whole forward; the plain view is
    kept unless the planned one is faster there too."""
    from aad_fast.model.runner import engine_view
    monkeypatch.setattr(cpu_linear, "measure_linear", lambda w, rows: {"plain": 1.0, "few_row": 0.5})
    seen = []

    def whole(view_plan, view_plain, rows):
        seen.append(rows)
        assert any(isinstance(m, FewRowLinear) for m in view_plan.modules())
        assert not any(isinstance(m, FewRowLinear) for m in view_plain.modules())
        return {"plain": whole_step_plain, "planned": 2.0, "stable": True}
    monkeypatch.setattr(cpu_linear, "measure_forward", whole)
    view, plan = engine_view(tiny_model(), 2)
    assert seen == [2]
    assert any(isinstance(m, FewRowLinear) for m in view.modules()) == want_few
    assert {r["choice"] for r in plan.values()} == {"few_row" if want_few else "plain"}
    if not want_few:
        assert {r["source"] for r in plan.values()} == {"whole-step check"}
    engine_view(tiny_model(), 2)
    assert seen == [2]  # cached


# ---------------------------------------------------------------------------- packed (oneDNN)
needs_packed = pytest.mark.skipif(not cpu_linear.packed_supported(),
                                  reason="this torch build has no oneDNN packed linear")


@needs_packed
@pytest.mark.parametrize("shape", [(1, 192), (1, 1, 192), (2, 1, 192), (8, 1, 192), (16, 192),
                                   (33, 192), (5, 40, 192)])
@pytest.mark.parametrize("bias", [True, False])
def test_packed_same_product_as_f_linear(shape, bias):
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(320, 192, generator=g), torch.randn(320, generator=g) if bias else None
    x = torch.randn(shape, generator=g)
    with torch.inference_mode():
        got = packed_linear(x, w, b)
        assert got.shape == shape[:-1] + (320,) and got.is_contiguous()
        # fp32 with another summation order: a few ulps of sums of ~200 terms of size ~1
        torch.testing.assert_close(got, F.linear(x, w, b), rtol=1e-5, atol=1e-5)
        xs = torch.randn(shape[:-1] + (384,), generator=g)[..., ::2]  # a strided input
        torch.testing.assert_close(packed_linear(xs, w, b), F.linear(xs, w, b),
                                   rtol=1e-5, atol=1e-5)


@needs_packed
def test_packed_copy_is_made_once_per_weight_renewed_on_write_and_freed_with_its_views():
    import gc
    lin = nn.Linear(16, 8)
    a, b = PackedLinear(lin, 4), PackedLinear(lin, 8)  # two views of one weight: one copy
    assert a.weight is lin.weight and b.weight is lin.weight
    first = cpu_linear.packed(lin.weight)
    assert a._pack is first and b._pack is first
    assert cpu_linear.packed_bytes([lin.weight]) == 0  # nothing more to pack
    x = torch.randn(3, 1, 16)
    with torch.no_grad():
        lin.weight.mul_(2)  # written in place: the copy would be stale
    with torch.inference_mode():
        torch.testing.assert_close(a(x), lin(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b(x), lin(x), rtol=1e-5, atol=1e-5)
    assert a._pack is not first and a._pack is b._pack  # packed again, once
    other = nn.Linear(16, 8)
    assert cpu_linear.packed_bytes([other.weight, other.weight]) == 16 * 8 * 4  # counted once
    del a, b, first
    gc.collect()
    assert cpu_linear.packed_bytes([lin.weight]) == 16 * 8 * 4  # no view holds it: freed


def test_a_packed_plan_the_whole_step_turns_down_leaves_no_copy(monkeypatch):
    import gc
    from aad_fast.model.runner import engine_view
    if not cpu_linear.packed_supported():
        pytest.skip("this torch build has no oneDNN packed linear")
    monkeypatch.setattr(cpu_linear, "measure_linear", lambda w, rows: {"plain": 1.0, "packed": 0.5})
    monkeypatch.setattr(cpu_linear, "measure_forward",
                        lambda *a: {"plain": 1.0, "planned": 2.0, "stable": True})
    model = tiny_model()
    view, plan = engine_view(model, 2)
    gc.collect()
    assert {r["source"] for r in plan.values()} == {"whole-step check"}
    weights = [m.weight for m in model.modules() if type(m) is nn.Linear]
    unique = {id(w): w for w in weights}.values()
    assert cpu_linear.packed_bytes(weights) == sum(w.numel() * 4 for w in unique)


@needs_packed
def test_packed_module_takes_its_path_up_to_max_rows_only(monkeypatch):
    calls = []
    real = cpu_linear.packed_linear
    monkeypatch.setattr(cpu_linear, "packed_linear",
                        lambda *a: calls.append(a[0].shape) or real(*a))
    lin = nn.Linear(16, 8)
    mod = PackedLinear(lin, max_rows=4)
    for rows, took in ((1, True), (4, True), (5, False), (2 * 3, False)):
        x = torch.randn(rows, 1, 16)
        with torch.inference_mode():
            torch.testing.assert_close(mod(x), lin(x), rtol=1e-5, atol=1e-5)
        assert (len(calls) == 1) == took, rows
        calls.clear()


def test_measurement_can_choose_packed_and_the_view_gets_it(monkeypatch):
    from aad_fast.model.runner import engine_view
    monkeypatch.setattr(cpu_linear, "packed_supported", lambda: True)
    monkeypatch.setattr(cpu_linear, "measure_linear",
                        lambda w, rows: {"plain": 1.0, "few_row": 0.9, "packed": 0.5})
    monkeypatch.setattr(cpu_linear, "measure_forward",
                        lambda *a: {"plain": 1.0, "planned": 0.5, "stable": True})
    view, plan = engine_view(tiny_model(), 2)
    assert {r["choice"] for r in plan.values()} == {"packed"}
    assert all("packed 0.500 ms" in v for v in cpu_linear.summarize(plan).values())
    assert any(isinstance(m, PackedLinear) for m in view.modules())


def test_packed_copies_that_do_not_fit_in_memory_are_refused(monkeypatch):
    from aad_fast.model.runner import engine_view
    monkeypatch.setattr(cpu_linear, "packed_supported", lambda: True)
    monkeypatch.setattr(cpu_linear, "measure_linear", lambda w, rows: {"plain": 1.0, "packed": 0.5})
    import aad_fast.model.runner as runner
    asked = []
    monkeypatch.setattr(runner, "fits_in_memory", lambda extra: asked.append(extra) or False)
    model = tiny_model()
    view, plan = engine_view(model, 2)
    linear_bytes = sum(m.weight.numel() * 4 for m in model.modules() if type(m) is nn.Linear)
    assert asked == [linear_bytes]  # every packed weight, each once
    assert {r["choice"] for r in plan.values()} == {"plain"}
    assert {r["source"] for r in plan.values()} == {"memory: no room for packed copies"}
    assert not any(isinstance(m, PackedLinear) for m in view.modules())


@needs_packed
def test_compiled_step_multiplies_like_the_eager_packed_step():
    """Inductor cannot lower oneDNN's packed tensors: the compiled step calls the same packed
    product through the ``aad_fast::packed_linear`` op, so compiled tokens equal eager ones."""
    ma, mr = tiny_model("llama", 0), tiny_model("llama", 1)
    outs = []
    for comp in (False, True):
        dec = Decoder(ma, mr, max_batch_size=2, max_seq_len=40, cpu_linear="packed", compile=comp)
        out = dec.generate(input_ids=PROMPTS, rule=AAD(0.1), max_new_tokens=8)
        assert out.stats["compiled"] == comp
        assert all(v.startswith("packed") for v in out.stats["linear"].values())
        outs.append(out.tokens)
        dec.close()
    assert outs[0] == outs[1] == naive_decode(aad_pick(0.1), (ma, mr), PROMPTS, 8)


def test_a_build_whose_packed_ops_fail_offers_no_packed_layout(monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("no oneDNN kernel for this CPU")
    cpu_linear.packed_supported.cache_clear()
    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", broken)
    try:
        assert not cpu_linear.packed_supported()
        assert cpu_linear.plan_linears(nn.Linear(8, 16), 2, "packed")[(16, 8)]["choice"] == "plain"
    finally:
        monkeypatch.undo()
        cpu_linear.packed_supported.cache_clear()


# ---------------------------------------------------------------- issue 23: the cache file, any content
@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b'{"k": 5}', b'"x"', b"\xff\xfe",
                                     b"[" * 100000, "dir"],
                         ids=["garbage", "list", "wrong-shape", "string", "not-utf8", "deep", "dir"])
def test_a_cache_file_not_ours_is_left_byte_for_byte(tmp_path, content):
    path = tmp_path / "tuning.json"
    if content == "dir":
        path.mkdir()
    else:
        path.write_bytes(content)
    measure, seen = _fake(1.0, 0.5)
    assert cpu_linear.plan_linears(nn.Linear(4, 4), 1, measure=measure)[(4, 4)]["choice"] == "few_row"
    assert seen == [((4, 4), 1)]
    if content == "dir":
        assert path.is_dir() and not list(path.iterdir())
    else:
        assert path.read_bytes() == content
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tuning.json"]  # no temporary left


def test_hand_edited_records_are_measured_again_never_used(tmp_path):
    net = nn.Sequential(nn.Linear(8, 16))
    measure, seen = _fake(1.0, 0.5)
    cpu_linear.plan_linears(net, 2, measure=measure)
    path = tmp_path / "tuning.json"
    data = json.loads(path.read_text())
    (key,) = data
    entry = next(e for e in data[key] if e.startswith("linear/"))
    for bad in ({"choice": "bogus"}, 5, {"choice": "few_row", "plain_ms": "x", "few_row_ms": None},
                {"choice": True}):
        data[key][entry] = bad
        path.write_text(json.dumps(data))
        tuning.forget()
        plan = cpu_linear.plan_linears(net, 2, measure=measure)
        assert plan[(16, 8)]["choice"] in ("plain", "few_row", "packed"), bad
        cpu_linear.summarize(plan)
    tuning.forget()
    model = tiny_model()
    n = torch.get_num_threads()
    if n > 1:
        data = json.loads(path.read_text())
        ts = lambda *a: {**{str(c): 1.0 for c in threads.thread_candidates(n)}, "stable": True}
        threads.threads_choice(model, 2, "auto", measure=ts)
        data = json.loads(path.read_text())
        entry = next(e for e in data[key] if e.startswith("threads/"))
        data[key][entry] = {"choice": "abc"}
        path.write_text(json.dumps(data))
        tuning.forget()
        assert threads.threads_choice(model, 2, "auto", measure=ts) in (None,) + tuple(
            threads.thread_candidates(n))
    data = json.loads(path.read_text())
    data[key]["compile/x"] = {"eager_ms": "1", "compiled_ms": 0.1, "compile_s": 0.0}
    path.write_text(json.dumps(data))
    tuning.forget()
    assert tuning.compile_pays("compile/x", 1000) is False


def test_a_full_disk_or_read_only_cache_costs_a_measurement_only(tmp_path, monkeypatch):
    import errno
    path = tmp_path / "tuning.json"

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    measure, seen = _fake(1.0, 0.5)
    with monkeypatch.context() as m:
        m.setattr(tuning.json, "dump", full)
        assert cpu_linear.plan_linears(nn.Linear(4, 4), 1, measure=measure)[(4, 4)]["choice"] == \
            "few_row"
    assert list(tmp_path.iterdir()) == []  # no temporary left, no cache
    monkeypatch.setenv("AAD_FAST_TUNE_CACHE", str(tmp_path / "ro" / "tuning.json"))
    (tmp_path / "ro").mkdir(mode=0o500)
    tuning.forget()
    try:
        assert cpu_linear.plan_linears(nn.Linear(4, 4), 1, measure=measure)[(4, 4)]["choice"] == \
            "few_row"
    finally:
        (tmp_path / "ro").chmod(0o700)
