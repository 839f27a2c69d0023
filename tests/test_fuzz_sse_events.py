"""The stream relay sends whole SSE events (so an in-band error after a cut always parses):
for any chunking of any event stream, what goes out is the same bytes, and every piece but the
last ends at an event boundary."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from guard.proxy.forward import _WholeEvents

EVENT = st.one_of(
    st.text(st.characters(blacklist_characters="\r\n"), max_size=30).map(lambda t: f"data: {t}\n\n".encode()),
    st.text(st.characters(blacklist_characters="\r\n"), max_size=10).map(lambda t: f"data: {t}\r\n\r\n".encode()),
    st.just(b": keep-alive\n\n"), st.just(b"event: x\ndata: y\n\n"), st.just(b"data: [DONE]\n\n"),
)


@settings(max_examples=300, derandomize=True, database=None)
@given(events=st.lists(EVENT, max_size=20), tail=st.binary(max_size=20).filter(lambda b: b"\n" not in b),
       cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=30))
def test_whole_events_for_any_chunking(events, tail, cuts):
    stream = b"".join(events) + tail  # an unfinished event at the end is flushed by rest()
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    relay = _WholeEvents()
    out = [piece for a, b in zip(points, points[1:]) if (piece := relay.feed(stream[a:b]))]
    assert b"".join(out) + relay.rest() == stream
    assert all(piece.endswith((b"\n\n", b"\n\r\n")) for piece in out)
    assert b"".join(out) == b"".join(events)[:len(b"".join(out))]
