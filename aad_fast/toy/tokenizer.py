"""The toy task's word-level tokenizer (``tokenizers`` library) as a ``PreTrainedTokenizerFast``.

One id per word of ``task.vocabulary()``, after six special tokens:

====  ===============  =========================================================
id    token            use
====  ===============  =========================================================
0     ``<pad>``        padding
1     ``<bos>``        start of every chat-rendered sequence (from the template)
2     ``<eos>``        end of an assistant turn
3     ``<unk>``        any word outside the vocabulary
4     ``<user>``       user turn marker (the AAD paper also stops decoding here)
5     ``<assistant>``  assistant turn marker
====  ===============  =========================================================

Text is lower-cased and split on whitespace; decoding joins words with single spaces, so any
lower-case text with single spaces between known words round-trips exactly. Plain ``tok(text)``
adds no special token: ``<bos>`` comes from the chat template, so ``apply_chat_template`` and
tokenising the rendered string give the same ids (TRL's trainers use both paths).
"""
from __future__ import annotations

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from . import task

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
USER, ASSISTANT = "<user>", "<assistant>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK, USER, ASSISTANT]

# Turns: "<bos> <user> question <assistant> answer <eos> <user> ..."; the generation prompt ends
# with "<assistant>". Spaces do not matter to the word-level split; they keep decode readable.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '<user> ' + message['content'] + ' ' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '<assistant> ' + message['content'] + ' ' + eos_token + ' ' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<assistant> ' }}{% endif %}"
)


def build_tokenizer(words: list[str] | None = None) -> PreTrainedTokenizerFast:
    """A fresh tokenizer over ``words`` (default: the task's vocabulary) with the chat template.

    Ids are fixed by the order of ``SPECIAL_TOKENS`` and ``words``, so building twice gives the
    same tokenizer; the shipped pair's tokenizer is this one saved with ``save_pretrained``.
    """
    words = task.vocabulary() if words is None else list(words)
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for w in words:
        vocab.setdefault(w, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        additional_special_tokens=[USER, ASSISTANT], clean_up_tokenization_spaces=False,
        model_max_length=64, padding_side="left",
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def render_prompt(tok: PreTrainedTokenizerFast, question: str) -> str:
    """The chat-rendered single-turn prompt for ``question``, ending with ``<assistant>``."""
    return tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                   add_generation_prompt=True)


def stop_ids(tok: PreTrainedTokenizerFast) -> list[int]:
    """Ids that end a completion: ``<eos>`` and the ``<user>`` marker (as in the AAD paper),
    those of them ``tok`` has. Another model's tokenizer (``make-pairs`` on your models) has no
    ``<user>`` token: it must not turn into ``None`` or the unknown token's id."""
    vocab = tok.get_vocab()
    ids = [tok.eos_token_id] if tok.eos_token_id is not None else []
    if USER in vocab:
        ids.append(vocab[USER])
    return ids
