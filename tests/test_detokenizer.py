"""Incremental detokenization never emits a broken UTF-8 character."""
from hypothesis import assume, given, settings, strategies as st

from nanoflow.models.loader import resolve_model
from nanoflow.tokenizer import IncrementalDetokenizer, load_tokenizer

TOK = load_tokenizer(resolve_model("default"))


def _pieces(text: str) -> list[str]:
    d = IncrementalDetokenizer(TOK)
    return [d.step(t) for t in TOK.encode(text, add_special_tokens=False)]


def test_multibyte_characters_whole():
    text = "Héllo wörld 🌍🚀 世界 naïve café — ok"
    pieces = _pieces(text)
    assert "".join(pieces) == TOK.decode(TOK.encode(text, add_special_tokens=False))
    assert all("\ufffd" not in p for p in pieces)


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=40))
def test_any_text_streams_cleanly(text):
    full = TOK.decode(TOK.encode(text, add_special_tokens=False))
    assume("\ufffd" not in full)  # text the byte-level vocabulary cannot represent has no clean stream
    pieces = _pieces(text)
    assert "".join(pieces) == full
    assert all("\ufffd" not in p for p in pieces)
