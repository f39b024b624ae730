"""Stop strings on rank 0 (disagg_mpi/stops.py): the pure matcher and the token tracker."""

from __future__ import annotations

import functools
import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from disagg_mpi.stops import StopMatcher, StopTracker, check_stop_strings


def reference(text: str, stops: list[str], include: bool) -> tuple[str, bool]:
    """The answer by brute force: the shortest prefix of `text` that contains a stop string, cut before
    the longest stop string it ends with (so the text left holds none)."""
    for end in range(len(text) + 1):
        found = [s for s in stops if text[:end].endswith(s)]
        if found:
            s = max(found, key=len)
            return (text[:end] if include else text[: end - len(s)]), True
    return text, False


def feed_pieces(pieces: list[str], stops: list[str], include: bool) -> tuple[list[str], bool]:
    m = StopMatcher(stops, include)
    outs = [m.feed(p) for p in pieces]
    if not m.stopped:
        outs.append(m.flush())
    return outs, m.stopped


def test_stop_split_across_pieces_never_leaks():
    outs, stopped = feed_pieces(["Hello wo", "r", "ld", "! more"], ["world"], False)
    assert stopped and "".join(outs) == "Hello "
    assert outs[:3] == ["Hello ", "", ""]  # "wo", "r", "ld" were held until decided
    outs, stopped = feed_pieces(["Hello wo", "r", "ld", "!"], ["world"], True)
    assert "".join(outs) == "Hello world"


def test_held_text_is_released_when_it_is_not_a_stop():
    m = StopMatcher(["abc"])
    assert m.feed("xxab") == "xx"
    assert m.feed("d") == "abd" and not m.stopped
    assert m.feed("a") == "" and m.flush() == "a"


def test_earliest_stop_wins_and_nothing_after_it():
    outs, stopped = feed_pieces(["one two three"], ["three", "two"], False)
    assert stopped and "".join(outs) == "one "
    m = StopMatcher(["b", "abc"])  # "b" is complete before "abc" is
    assert m.feed("zabc") == "za" and m.stop_string == "b"
    assert m.feed("more") == ""


ALPHABET = "ab\n "


@settings(max_examples=300, deadline=None)
@given(text=st.text(ALPHABET, max_size=30), stops=st.lists(st.text(ALPHABET, min_size=1, max_size=4),
                                                             min_size=1, max_size=4),
       cuts=st.lists(st.integers(0, 30), max_size=8), include=st.booleans())
def test_matches_brute_force_for_every_split(text, stops, cuts, include):
    bounds = sorted({0, len(text), *[c for c in cuts if c <= len(text)]})
    pieces = [text[a:b] for a, b in itertools.pairwise(bounds)]
    outs, stopped = feed_pieces(pieces, stops, include)
    want, want_stopped = reference(text, stops, include)
    assert ("".join(outs), stopped) == (want, want_stopped)
    # What went out at any moment is a prefix of the answer: no stop text ever leaked.
    sent = ""
    for o in outs:
        sent += o
        assert want.startswith(sent)


class CharTokenizer:
    """One token per character; token 0 is half of a two-byte character (decodes to U+FFFD)."""

    def decode(self, ids):
        s = "".join("\ufffd" if i == 0 else chr(i) for i in ids)
        return s.replace("\ufffd" + chr(1), "é")  # token 0 then 1 makes é


def ids(text: str) -> list[int]:
    return [ord(c) for c in text]


def test_tracker_pins_the_stop_to_its_token():
    t = StopTracker(CharTokenizer(), ["END"])
    assert t.add(ids("ok E")) == "ok "
    assert t.add(ids("ND tail")) == "" and t.stopped
    assert t.num_tokens == 6 and t.finish() == ""  # "ok END": the D completed the stop


def test_tracker_holds_a_partial_character_and_flushes_at_the_end():
    t = StopTracker(CharTokenizer(), [])
    assert t.add([ord("a"), 0]) == "a"
    assert t.add([1]) == "é"
    t = StopTracker(CharTokenizer(), ["zz"])
    assert t.add(ids("xz")) == "x" and t.finish() == "z"


@pytest.mark.parametrize("value, msg", [(5, "must be a string"), (["a", 1], "must be a string"),
                                        (["a"] * 5, "at most 4"), ([""], "empty string")])
def test_bad_stop_values(value, msg):
    with pytest.raises(ValueError, match=msg):
        check_stop_strings(value)
    assert check_stop_strings("x") == ["x"] and check_stop_strings(None) == []


@functools.cache
def _byte_tokenizer():
    from disagg_mpi.model.tokenizer import Tokenizer

    return Tokenizer.bytes_only(1024)  # multi-byte characters span tokens


@settings(max_examples=150, deadline=None)
@given(text=st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40),
       sizes=st.lists(st.integers(1, 4), max_size=20))
def test_tracker_equals_decoding_everything(text, sizes):
    """Incremental (windowed) decoding of byte tokens, fed in any grouping, gives the full decode and
    never emits half a character."""
    tok = _byte_tokenizer()
    ids = tok.encode(text)
    t = StopTracker(tok)
    parts, k = [], 0
    for n in sizes + [len(ids)]:
        parts.append(t.add(ids[k:k + n]))
        k += n
    parts.append(t.finish())
    assert "".join(parts) == tok.decode(ids)
    assert all("\ufffd" not in p for p in parts) or "\ufffd" in tok.decode(ids)
