"""The thread count a Decoder's calls run with (``threads.threads_choice``): the process's unless
fewer threads were measured faster (fake timings here), set only while a call holds the Decoder,
forced by the switch; tokens do not depend on it."""
import pytest
import torch

from aad_fast import AAD, Decoder, tuning
from conftest import PROMPTS, tiny_model
from aad_fast.model import threads


@pytest.fixture(autouse=True)
def _two_threads(monkeypatch):
    monkeypatch.setenv("AAD_FAST_TUNE_CACHE", "off")
    monkeypatch.delenv("AAD_FAST_THREADS", raising=False)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    tuning.forget()
    yield
    tuning.forget()
    torch.set_num_threads(before)


def _fake(one, many, stable=True):
    seen = []

    def measure(model, counts, rows):
        seen.append((tuple(counts), rows))
        return dict(one if rows == 1 else many, stable=stable)
    return measure, seen


def test_fewer_threads_only_where_faster_at_one_row_and_not_slower_batched():
    model = tiny_model("llama", 0)
    faster, seen = _fake({"2": 10.0, "1": 6.0}, {"2": 20.0, "1": 20.5})
    assert threads.threads_choice(model, 8, measure=faster) == 1
    assert seen == [((2, 1), 1), ((2, 1), 8)]
    assert threads.threads_choice(model, 8, measure=lambda *a: 1 / 0) == 1  # cached
    slower_batched, _ = _fake({"2": 10.0, "1": 6.0}, {"2": 20.0, "1": 30.0})
    assert threads.threads_choice(model, 4, measure=slower_batched) is None
    noise, _ = _fake({"2": 10.0, "1": 9.8}, {"2": 20.0, "1": 19.0})
    assert threads.threads_choice(model, 2, measure=noise) is None
    busy, _ = _fake({"2": 10.0, "1": 5.0}, {"2": 20.0, "1": 10.0}, stable=False)
    assert threads.threads_choice(model, 3, measure=busy) is None
    real = threads.measure_threads(model, [2, 1], 2)  # the real timer, count restored
    assert set(real) == {"2", "1", "stable"} and torch.get_num_threads() == 2


def test_switch_forces_and_bad_values_name_the_argument(monkeypatch):
    model = tiny_model("llama", 0)
    boom = lambda *a: 1 / 0  # noqa: E731
    assert threads.threads_choice(model, 8, "keep", boom) is None
    assert threads.threads_choice(model, 8, 3, boom) == 3
    monkeypatch.setenv("AAD_FAST_THREADS", "1")
    assert threads.threads_choice(model, 8, measure=boom) == 1
    monkeypatch.setenv("AAD_FAST_THREADS", "keep")
    assert threads.threads_choice(model, 8, measure=boom) is None
    for bad in (0, -2, True, "many", 1.5):
        with pytest.raises(ValueError, match="threads"):
            Decoder(model, threads=bad)
    monkeypatch.setenv("AAD_FAST_THREADS", "lots")
    with pytest.raises(ValueError, match="AAD_FAST_THREADS"):
        Decoder(model)
    assert threads.thread_candidates(8) == [8, 4, 2] and threads.thread_candidates(1) == [1]


def test_calls_run_with_the_chosen_count_and_put_the_process_count_back():
    a, r = tiny_model("llama", 0), tiny_model("llama", 1)
    with Decoder(a, r, max_batch_size=2, max_seq_len=40, threads="keep") as dec:
        want = dec.generate(input_ids=PROMPTS[:2], rule=AAD(0.1), max_new_tokens=8)
    assert want.stats["threads"] == 2
    with Decoder(a, r, max_batch_size=2, max_seq_len=40, threads=1) as dec:
        got = dec.generate(input_ids=PROMPTS[:2], rule=AAD(0.1), max_new_tokens=8)
        assert torch.get_num_threads() == 2  # between calls: the process's count
        with dec._locked():  # what the server holds per burst
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
    assert got.stats["threads"] == 1 and got.tokens == want.tokens


def test_a_stream_decodes_with_its_count_and_the_caller_runs_with_its_own(monkeypatch):
    """Between two pieces of a stream the caller's code runs with the process's count (it
    held the Decoder's count while suspended before); each burst runs with the Decoder's."""
    from aad_fast.decode.scheduler import Scheduler
    from aad_fast.toy.assets import load_default_pair
    _, dpo, tok, _, _ = load_default_pair("cpu")
    process = torch.get_num_threads()
    mine = 1 if process > 1 else 2
    seen = []
    burst = Scheduler.burst

    def spy(self, on_admit=None):
        seen.append(torch.get_num_threads())
        return burst(self, on_admit)
    monkeypatch.setattr(Scheduler, "burst", spy)
    with Decoder(dpo, tokenizer=tok, max_batch_size=1, max_seq_len=96, check_every=2,
                 threads=mine) as dec:
        pieces, between = [], []
        for piece in dec.stream("what is 2 plus 3 ?", rule=AAD(0.1), chat=True,
                                max_new_tokens=12):
            between.append(torch.get_num_threads())
            pieces.append(piece)
        want = dec.generate(["what is 2 plus 3 ?"], rule=AAD(0.1), chat=True, max_new_tokens=12)
    assert len(pieces) > 1 and "".join(pieces) == want.text[0]
    assert set(between) == {process} and set(seen) == {mine}
    assert torch.get_num_threads() == process


# ---------------------------------------------------------------- issue 23: a stream across threads
def _stream_decoder():
    from aad_fast.toy.tokenizer import build_tokenizer
    tok = build_tokenizer()
    a, r = tiny_model("llama", 0, vocab=len(tok)), tiny_model("llama", 1, vocab=len(tok))
    return Decoder(a, r, tokenizer=tok, max_batch_size=2, max_seq_len=40, check_every=1,
                   threads="keep", compile=False)


_PARKED = None


@pytest.fixture(autouse=True)
def _park():
    """Threads of ``_in_thread`` stay alive until the test ends (a thread's id is reused once
    it has ended: distinct live threads have distinct ids)."""
    import threading
    global _PARKED
    _PARKED = threading.Event()
    yield
    _PARKED.set()


def _in_thread(fn, timeout=60):
    """``fn()`` in a new thread (kept alive until the test ends); its result (or exception),
    failing if it does not return."""
    import threading
    box, ran = {}, threading.Event()

    def run():
        try:
            box["out"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            box["exc"] = exc
        ran.set()
        _PARKED.wait(120)
    threading.Thread(target=run, daemon=True).start()
    assert ran.wait(timeout), "the call hung: the Decoder was left held"
    if "exc" in box:
        raise box["exc"]
    return box.get("out")


@pytest.mark.parametrize("end", ["exhaust", "close", "drop"])
def test_a_stream_resumed_in_other_threads_leaves_the_decoder_usable(end):
    """What a thread pool does with a sync generator (Starlette's StreamingResponse): each
    piece is taken in whichever worker thread is free; the end (exhausted, closed, dropped)
    comes in yet another. The Decoder is free afterwards for every thread."""
    import gc
    dec = _stream_decoder()
    prompt = "what is 2 plus 3 ?"
    want = dec.generate(prompt, rule=AAD(0.1), max_new_tokens=6).text[0]
    box = {"it": dec.stream(prompt, rule=AAD(0.1), max_new_tokens=6)}
    pieces = [_in_thread(lambda: next(box["it"]))]
    pieces.append(_in_thread(lambda: next(box["it"], "")))  # another worker resumes it
    if end == "exhaust":
        pieces += _in_thread(lambda: list(box["it"]))
        assert "".join(pieces) == want
    elif end == "close":
        _in_thread(lambda: box["it"].close())
    else:
        _in_thread(lambda: (box.pop("it"), gc.collect()))
    got = _in_thread(lambda: dec.generate(prompt, rule=AAD(0.1), max_new_tokens=6))
    assert got.text[0] == want
    assert dec.generate(prompt, rule=AAD(0.1), max_new_tokens=6).text[0] == want  # this thread


def test_another_thread_waits_for_an_open_stream_and_the_same_thread_is_refused():
    import threading
    dec = _stream_decoder()
    prompt = "what is 2 plus 3 ?"
    it = dec.stream(prompt, rule=AAD(0.1), max_new_tokens=6)
    first = next(it)
    with pytest.raises(RuntimeError, match="already decoding in this thread"):
        dec.generate(prompt, max_new_tokens=2)
    done = threading.Event()
    t = threading.Thread(target=lambda: (dec.generate(prompt, max_new_tokens=2), done.set()),
                         daemon=True)
    t.start()
    assert not done.wait(0.5)  # waits for the stream, never overlaps it
    rest = "".join(it)
    t.join(60)
    assert done.is_set() and first + rest == dec.generate(prompt, max_new_tokens=6).text[0]
