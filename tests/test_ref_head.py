"""The reference's logits on the aligned stream's candidates only (engine.decode_one_split).

AAD and Contrastive read stream r only on the candidates of stream a, so the CPU step of a
two-model pair projects r's last hidden state on those ids alone (engine.reference_logits) instead of the whole
vocabulary. Every test compares token ids exactly with the naive loop of docs/rules.md (or with
the full projection) and checks from ``stats["reference_head"]`` which path ran. The models have
a 512-token vocabulary so that alpha = 0.1 keeps a few percent of it, as trained models do (the
61-token models of the other tests keep too many for the sparse path, see the fallback test).
"""
import copy
import math

import pytest
import torch

from aad_fast import AAD, Contrastive, Decoder, EFT, Greedy
from aad_fast.decode import steps as engine
from aad_fast.model.forward import TYPES as SPLIT_TYPES
from aad_fast.model.runner import SplitHead, engine_view
from aad_fast.decode.scheduler import Request
from conftest import PROMPTS, aad_pick, naive_decode, random_lora, tiny_model

V = 512
ARCHS = ["llama", "qwen2", "qwen3", "mistral", "olmo2"]


def models(arch="llama"):
    return tiny_model(arch, 0, V), tiny_model(arch, 1, V)


def ran_sparse(gen) -> bool:
    """The sparse path ran (a step with many candidates may still take the full one)."""
    return gen.stats["reference_head"]["sparse_steps"] > 0


@pytest.mark.parametrize("arch", ARCHS)
def test_split_head_is_the_models_own_projection(arch):
    """head(decoder(x)) is the model's forward, for every architecture of SPLIT_TYPES."""
    assert arch in SPLIT_TYPES
    model = tiny_model(arch, 0, V)
    view, _ = engine_view(model, 1)
    split = SplitHead.of(view)
    ids = torch.tensor([[1, 5, 9, 30]])
    with torch.no_grad():
        want = model(input_ids=ids).logits
        got = split.head(split.decoder(input_ids=ids).last_hidden_state)
    assert torch.equal(got, want)


@pytest.mark.parametrize("arch", ARCHS)
def test_two_model_aad_on_candidates_equals_the_naive_loop(arch):
    a, r = models(arch)
    with Decoder(a, r, max_batch_size=4, max_seq_len=48) as dec:
        got = dec.generate(input_ids=PROMPTS, rule=AAD(0.1), max_new_tokens=10)
    assert ran_sparse(got)
    assert got.tokens == naive_decode(aad_pick(0.1), (a, r), PROMPTS, 10)


def test_shared_pairs_project_every_id():
    """A LoRA pair reads one head for both streams: no split (the a rows' head and the r rows'
    are one GEMM), the naive loop's tokens."""
    base = tiny_model("qwen2", 0, V)
    pm = random_lora(copy.deepcopy(base), seed=3)
    merged = copy.deepcopy(pm).merge_and_unload().eval()
    with Decoder(pm, max_batch_size=4, max_seq_len=48) as dec:
        got = dec.generate(input_ids=PROMPTS, rule=AAD(0.1), max_new_tokens=10)
    assert got.stats["pair"] == "lora"
    assert got.stats["reference_head"] == {"sparse_steps": 0, "full_steps": 0,
                                           "candidates_per_step": None}
    assert got.tokens == naive_decode(aad_pick(0.1), (merged, base), PROMPTS, 10)


def test_full_projection_switch_gives_the_same_tokens(monkeypatch):
    a, r = models()
    with Decoder(a, r, max_batch_size=4, max_seq_len=48) as dec:
        sparse = dec.generate(input_ids=PROMPTS, rule=AAD(0.1), max_new_tokens=10)
        monkeypatch.setenv("AAD_FAST_REF_HEAD", "full")
        full = dec.generate(input_ids=PROMPTS, rule=AAD(0.1), max_new_tokens=10)
        monkeypatch.setenv("AAD_FAST_REF_HEAD", "sometimes")
        with pytest.raises(ValueError, match="AAD_FAST_REF_HEAD"):
            dec.generate(input_ids=PROMPTS, rule=AAD(0.1), max_new_tokens=10)
    assert ran_sparse(sparse)
    assert full.stats["reference_head"]["sparse_steps"] == 0
    assert sparse.tokens == full.tokens


def test_many_candidates_fall_back_to_the_full_projection():
    """Near-uniform logits (alpha = 0.1 keeps most of the vocabulary) and alpha = 0 (every
    finite token): the step projects the whole vocabulary, same tokens as the naive loop."""
    a, r = models()
    with Decoder(a, r, max_batch_size=4, max_seq_len=48) as dec:
        got = dec.generate(input_ids=PROMPTS, rule=AAD(0.0), max_new_tokens=6)
    assert got.stats["reference_head"]["full_steps"] > 0
    assert got.stats["reference_head"]["sparse_steps"] == 0
    assert got.tokens == naive_decode(aad_pick(0.0), (a, r), PROMPTS, 6)


def test_mixed_alphas_and_betas_in_one_batch_equal_each_alone():
    """Per-row values: one row with alpha = 0 makes those steps take the full projection for
    the whole batch; Contrastive with beta 0.5 and 0; each request = decoding it alone."""
    a, r = models()
    rules = [Contrastive(0.1, 0.5), Contrastive(0.3, 0.5), Contrastive(0.1, 0.0),
             Contrastive(0.0, 0.5)]
    prompts = PROMPTS + [[1, 40, 41]]
    with Decoder(a, r, max_batch_size=4, max_seq_len=48) as dec:
        sched = dec.scheduler(Contrastive(0.1, 0.5))
        res = [sched.submit(Request(ids_a=p, rule=rule, max_new_tokens=8, tag=i))
               for i, (p, rule) in enumerate(zip(prompts, rules))]
        sched.run_until_idle()
    for p, rule, got in zip(prompts, rules, res):
        want = naive_decode(aad_pick(rule.alpha, rule.beta), (a, r), [p], 8)[0]
        assert got.tokens == want, rule


def test_mixed_rows_take_the_sparse_path_once_alpha_zero_is_gone():
    """The same scheduler: a sparse step after the alpha = 0 row was refilled (the count is per
    step), tokens still exact."""
    a, r = models()
    with Decoder(a, r, max_batch_size=2, max_seq_len=48) as dec:
        sched = dec.scheduler(AAD(0.1))
        first = [sched.submit(Request(ids_a=PROMPTS[0], rule=AAD(0.0), max_new_tokens=2)),
                 sched.submit(Request(ids_a=PROMPTS[1], max_new_tokens=12))]
        later = sched.submit(Request(ids_a=PROMPTS[2], max_new_tokens=12))
        sched.run_until_idle()
        counts = sched.st.ref_head
    assert counts["full"] > 0 and counts["sparse"] > 0
    assert first[0].tokens == naive_decode(aad_pick(0.0), (a, r), [PROMPTS[0]], 2)[0]
    for p, res in ((PROMPTS[1], first[1]), (PROMPTS[2], later)):
        assert res.tokens == naive_decode(aad_pick(0.1), (a, r), [p], 12)[0]


def test_sparse_reference_logits_are_the_projection_on_the_candidates():
    a, r = models()
    with Decoder(a, r, max_batch_size=3, max_seq_len=48) as dec:
        pair = dec._pair(3, "ar", 40)
        ent = dec._entry(pair, 3, AAD(0.1))
        sel, st = ent["sel"], ent["st"]
        from aad_fast.decode.prompt_rows import left_pad
        with torch.inference_mode():
            ids, real = left_pad(PROMPTS, 3, dec.device)
            engine.prefill(pair, sel, st, ids, real, ids, real)
            logits_a, hidden = pair.step_split(st.tok)
            got = engine.reference_logits(pair.ref_split, sel, st, logits_a, hidden)
            full = pair.ref_split.base_logits(hidden)
    cand = sel.candidates(logits_a)
    assert 0 < cand.sum() * engine.SPARSE_SHARE <= V
    torch.testing.assert_close(got[cand], full[:, :V][cand], rtol=1e-5, atol=1e-5)
    assert torch.all(got[~cand] == 0)
    # the choice equals the core's on the full projection
    assert torch.equal(sel(logits_a, got, st.t), sel(logits_a, full, st.t))


def test_rules_that_need_the_whole_reference_do_not_split():
    a, r = models()
    with Decoder(a, r, max_batch_size=4, max_seq_len=48) as dec:
        for rule in (EFT(2.0), Greedy("a")):
            got = dec.generate(input_ids=PROMPTS, rule=rule, max_new_tokens=4)
            assert got.stats["reference_head"]["sparse_steps"] == 0, rule
            assert got.stats["reference_head"]["full_steps"] == 0, rule


def test_nan_reference_on_the_candidates_is_reported_naming_the_reference():
    a, r = models()
    bad = copy.deepcopy(r)
    with torch.no_grad():
        bad.model.layers[0].mlp.down_proj.weight.fill_(float("nan"))
    with Decoder(a, bad, max_batch_size=4, max_seq_len=48) as dec:
        with pytest.raises(RuntimeError, match=r"row\(s\) \[0, 1\]: the reference model"):
            dec.generate(input_ids=PROMPTS[:2], rule=AAD(0.1), max_new_tokens=4)


def test_bf16_reference_on_candidates_matches_the_full_projection():
    a, r = (m.to(torch.bfloat16) for m in models())
    with Decoder(a, r, max_batch_size=4, max_seq_len=48) as dec:
        sparse = dec.generate(input_ids=PROMPTS, rule=AAD(0.1), max_new_tokens=8)
    with Decoder(a, r, max_batch_size=4, max_seq_len=48) as dec:
        import os
        os.environ["AAD_FAST_REF_HEAD"] = "full"
        try:
            full = dec.generate(input_ids=PROMPTS, rule=AAD(0.1), max_new_tokens=8)
        finally:
            del os.environ["AAD_FAST_REF_HEAD"]
    assert ran_sparse(sparse)
    assert sparse.tokens == full.tokens
    assert not math.isnan(sparse.stats["reference_head"]["candidates_per_step"])


def test_tied_embeddings_loaded_from_a_path_take_the_sparse_path(tmp_path):
    """A saved checkpoint with tied input/output embeddings (SmolLM2, Qwen2.5-0.5B, Llama-3.2
    do this) and GQA, loaded by path: the gathered rows are the tied embedding's."""
    from transformers import AutoModelForCausalLM
    from conftest import tiny_config
    paths = []
    for seed in (0, 1):
        cfg = tiny_config("qwen2", V)
        cfg.tie_word_embeddings = True
        torch.manual_seed(seed)
        m = AutoModelForCausalLM.from_config(cfg).float().eval()
        assert m.lm_head.weight is m.model.embed_tokens.weight
        m.save_pretrained(tmp_path / f"m{seed}")
        paths.append(tmp_path / f"m{seed}")
    a, r = (AutoModelForCausalLM.from_pretrained(p).eval() for p in paths)
    with Decoder(str(paths[0]), str(paths[1]), device="cpu", max_batch_size=4,
                 max_seq_len=48) as dec:
        got = dec.generate(input_ids=PROMPTS, rule=AAD(0.1), max_new_tokens=10)
    assert ran_sparse(got)
    assert got.tokens == naive_decode(aad_pick(0.1), (a, r), PROMPTS, 10)
