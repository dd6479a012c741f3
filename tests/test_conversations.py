"""Conversations as prompts (``chat=True``): a list of messages rendered whole by the chat
template, in the Python API and on the server; OPAD's principle joins the conversation's system
message (the third review found the server rendering a multi-message chat to ids first, so the
principle's raw text landed before the template's first marker)."""
import pytest

from aad_fast import OPAD, Decoder, Greedy


@pytest.fixture(scope="module")
def toy():
    from aad_fast.toy.assets import load_default_pair
    _, dpo, tok, _, _ = load_default_pair("cpu")
    return dpo, tok


def template_ids(tok, msgs):
    out = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


CONV = [{"role": "user", "content": "what is 2 plus 3 ?"},
        {"role": "assistant", "content": "five ."},
        {"role": "user", "content": "name the capital of peru ."}]


def test_a_conversation_is_rendered_whole(toy):
    dpo, tok = toy
    with Decoder(dpo, tokenizer=tok, max_batch_size=2, max_seq_len=96) as dec:
        got = dec.generate([CONV, "what is 7 minus 4 ?"], rule=Greedy(), chat=True,
                           max_new_tokens=8)
        want = dec.generate(input_ids=[template_ids(tok, CONV)], rule=Greedy(),
                            max_new_tokens=8)
        assert got.tokens[0] == want.tokens[0]
        with pytest.raises(ValueError, match="needs chat=True"):
            dec.generate(CONV, rule=Greedy(), max_new_tokens=4)
        with pytest.raises(ValueError, match=r"prompts\[0\]\[1\] must be"):
            dec.generate([[CONV[0], {"role": "bot", "content": "x"}]], rule=Greedy(),
                         chat=True, max_new_tokens=4)


def test_opad_principle_joins_the_conversations_system_message():
    """A template with a system role (the toy tokenizer's has none, so a copy gets one):
    stream a is the conversation with the principle opening its system message, stream r the
    conversation as given."""
    import copy

    from aad_fast.decode.prompt_rows import rule_rows
    from aad_fast.toy.assets import load_default_pair
    tok = copy.deepcopy(load_default_pair("cpu")[2])
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}"
                         "{{ '<system> ' + m['content'] + ' ' }}{% elif m['role'] == 'user' %}"
                         "{{ '<user> ' + m['content'] + ' ' }}{% else %}"
                         "{{ '<assistant> ' + m['content'] + ' ' + eos_token + ' ' }}{% endif %}"
                         "{% endfor %}{% if add_generation_prompt %}{{ '<assistant> ' }}{% endif %}")
    conv = [{"role": "system", "content": "answer briefly ."}] + CONV
    rows = rule_rows(OPAD(1.0, principle="be kind ."), "one", tok, len(tok), [conv], None,
                     None, True)
    merged = [{"role": "system", "content": "be kind .\n\nanswer briefly ."}] + CONV
    assert rows.a[0] == template_ids(tok, merged) and rows.r[0] == template_ids(tok, conv)
    rows = rule_rows(OPAD(1.0, principle="be kind ."), "one", tok, len(tok), [CONV], None,
                     None, True)
    assert rows.a[0] == template_ids(tok, [{"role": "system", "content": "be kind ."}] + CONV)


def test_server_opad_on_a_multi_message_chat_equals_the_decoder(toy):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from aad_fast.serve.http import create_app
    dpo, tok = toy
    dec = Decoder(dpo.get_base_model(), tokenizer=tok, max_batch_size=2, max_seq_len=96)
    msgs = [{"role": "system", "content": "answer briefly ."}] + CONV
    with TestClient(create_app(dec)) as client:
        r = client.post("/v1/chat/completions", json={
            "messages": msgs, "rule": "opad", "principle": "be kind .", "max_tokens": 8})
        assert r.status_code == 200, r.text
        got = r.json()["choices"][0]["token_ids"]
    want = dec.generate([msgs], rule=OPAD(1.0, principle="be kind ."), chat=True,
                        max_new_tokens=8, stop=[])
    assert got == want.tokens[0]
