"""decode/driver.py's shared pieces: the one batch-size bucketing and the one text-delta rule
(a trailing U+FFFD held back until final) that the Decoder and the server's loop both use."""
from aad_fast.decode.driver import Driver, bucket, text_delta
from aad_fast.decoder import Decoder, Generation


def test_bucket_is_the_next_power_of_two_capped():
    assert [bucket(n, 8) for n in range(1, 11)] == [1, 2, 4, 4, 8, 8, 8, 8, 8, 8]
    assert bucket(3, 3) == 3 and bucket(5, 6) == 6 and bucket(1, 1) == 1


def test_text_delta_holds_a_trailing_replacement_char_until_final():
    piece, shown = text_delta("", "ab\ufffd")
    assert (piece, shown) == ("ab", "ab")
    assert text_delta(shown, "ab\ufffd\ufffd") == ("", "ab")  # nothing new yet
    piece, shown = text_delta(shown, "abé")
    assert (piece, shown) == ("é", "abé")
    assert text_delta(shown, "abé\ufffd", final=True) == ("\ufffd", "abé\ufffd")
    assert text_delta("abc", "abd") == ("", "abc")  # a text that is no continuation: nothing


def test_pieces_join_to_the_final_text():
    texts = ["h", "h\ufffd", "hé", "hé w", "hé wo\ufffd\ufffd", "hé wor\ufffd"]
    shown, pieces = "", []
    for i, t in enumerate(texts):
        piece, shown = text_delta(shown, t, final=i == len(texts) - 1)
        pieces.append(piece)
    assert "".join(pieces) == texts[-1]


def test_the_decoder_runs_on_the_driver():
    assert issubclass(Decoder, Driver)
    assert all(hasattr(Driver, m) for m in ("_decode", "_beam", "_best_of_n", "_new_scheduler"))
    assert Generation.__name__ == "Generation"
