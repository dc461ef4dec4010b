"""Property test of caption handling: the base text is the complete text with exactly the
identifier's occurrences removed, every other word kept once and in order."""

from hypothesis import given, settings
from hypothesis import strategies as st

from purecc_jax.data import texts

# Words: any printable characters but separators and controls (punctuation, accents, CJK ...).
WORD = st.text(st.characters(blacklist_categories=("Z", "C")), min_size=1, max_size=8)
SPACE = st.text(st.sampled_from(" \t"), min_size=1, max_size=3)
IDENTIFIER = st.from_regex(r"[a-z]{2,6}", fullmatch=True)


@st.composite
def captions(draw):
    """(complete text, identifier, class word, the words in order) with the identifier 1-3 times,
    and words that contain it without being it ("sks," "masks") as likely neighbours."""
    identifier = draw(IDENTIFIER)
    near = st.sampled_from([identifier + ",", "(" + identifier + ")", "ma" + identifier, identifier.upper()])
    words = draw(st.lists(st.one_of(WORD, near).filter(lambda w: w != identifier), max_size=12))
    for _ in range(draw(st.integers(1, 3))):
        words.insert(draw(st.integers(0, len(words))), identifier)
    class_word = draw(WORD.filter(lambda w: w.lower() != identifier.lower()))
    seps = draw(st.lists(SPACE, min_size=len(words) + 1, max_size=len(words) + 1))
    text = seps[0] + "".join(w + s for w, s in zip(words, seps[1:]))
    return text, identifier, class_word, words


@settings(max_examples=200, deadline=None)
@given(captions())
def test_base_text_drops_exactly_the_identifier(case):
    text, identifier, class_word, words = case
    t = texts.derive(text, identifier, class_word)
    assert t.complete.split() == words
    assert t.base.split() == [w for w in words if w != identifier]
    assert t.base == " ".join(t.base.split())  # tidy: single spaces, no ends
    assert t.target == f"{identifier} {class_word}" and t.null == ""
