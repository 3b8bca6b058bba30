"""A request's prompt as the cache-aware policy matches it: text, packed three characters to an int.

The router matches on the request's text, as SGLang's router does, rather than on
the token ids the replica will compute. Text needs no tokenizer or chat template at
the router (which may run where the model files are not), costs no second
tokenization, and keeps the prefix relation that matters: two prompts whose texts
share a prefix share (nearly) that prefix in tokens too, and a chat request whose
messages extend an earlier conversation's extend its text.

  chat          each message as "\\x1e" role "\\x1f" content (text parts joined)
  responses     `instructions` (as a system message) and `input` (a string, or messages), as chat
  completions   `prompt`: a string; token ids; or a list of either (its first element)
  /generate     `text` or `input_ids` (or their first element)
  embeddings    `input`, as `prompt`

Three characters (21 bits each) pack into one int, so a key has about as many
elements as the prompt has tokens (English runs about four characters a token), and
the approximate trees' bound in elements stands for tokens. The last one or two
characters of a text (not a whole element) are left out. Token-id prompts are keyed
by their ids in their own namespace. Whatever cannot be read as a prompt gives no
key (the request then goes to the least loaded replica): the replica, not the
router, answers a malformed request.
"""

from __future__ import annotations

from typing import Any

from radixserve.router.policy import PromptKey

TEXT = "text"
IDS = "ids"
_SHIFT = 21  # bits per character: Unicode code points are < 0x110000
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def text_key(text: str) -> PromptKey:
    """`text` as ints, three characters each (a trailing partial element left out)."""
    ids = []
    for i in range(0, len(text) - 2, 3):
        ids.append((ord(text[i]) << (2 * _SHIFT)) | (ord(text[i + 1]) << _SHIFT) | ord(text[i + 2]))
    return PromptKey(TEXT, ids)


def _ids(prompt: list[Any]) -> PromptKey | None:
    if all(type(t) is int and _INT64_MIN <= t <= _INT64_MAX for t in prompt):
        return PromptKey(IDS, prompt)
    return None  # not token ids the tree can hold: the replica answers it


def _prompt_key(prompt: Any) -> PromptKey | None:
    """A string, token ids, or a batch of either (routed whole, by its first prompt)."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return text_key(prompt)
    if isinstance(prompt, list) and prompt:
        return _ids(prompt)
    return None


def _chat_text(messages: list[Any]) -> str | None:
    parts = []
    for msg in messages:
        if not isinstance(msg, dict):
            return None
        content = msg.get("content")
        if isinstance(content, list):
            content = "\n".join(p.get("text", "") for p in content if isinstance(p, dict))
        parts.append(f"\x1e{msg.get('role', '')}\x1f{content if isinstance(content, str) else ''}")
    return "".join(parts)


def _responses_messages(body: dict) -> list[Any] | None:
    """/v1/responses' input as chat messages (instructions first, as the server's template gets them)."""
    given = body.get("input")
    messages: Any = [{"role": "user", "content": given}] if isinstance(given, str) else given
    if not isinstance(messages, list):
        return None
    instructions = body.get("instructions")
    if isinstance(instructions, str) and instructions:
        messages = [{"role": "system", "content": instructions}, *messages]
    return messages


def request_key(route: str, body: Any) -> PromptKey | None:
    """The key of a JSON body sent to `route` ("chat", "completions", "generate", "embeddings",
    "responses")."""
    if not isinstance(body, dict):
        return None
    if route == "responses":
        messages = _responses_messages(body)
        text = _chat_text(messages) if messages is not None else None
        return text_key(text) if text else None
    if route == "chat":
        messages = body.get("messages")
        text = _chat_text(messages) if isinstance(messages, list) else None
        return text_key(text) if text else None
    field = {"completions": "prompt", "embeddings": "input"}.get(route)
    if field is not None:
        return _prompt_key(body.get(field))
    if route == "generate":
        return _prompt_key(body.get("text", body.get("input_ids")))
    return None


# -- answers ---------------------------------------------------------------------------------
# The engine caches a prompt and its answer; the next turn of a conversation (or a completion
# continued) starts with both. So once a replica has answered, the router records prompt +
# answer as that replica's, and the next turn matches all of it, not just the last prompt.


def answer_text(route: str, answer: Any, stream: bool) -> str | None:
    """The text of choice 0 in a chat or completions answer (a whole body, or one stream chunk)."""
    if route not in ("chat", "completions") or not isinstance(answer, dict):
        return None
    choices = answer.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return None
    choice = choices[0]
    if choice.get("index", 0) != 0:
        return None
    if route == "completions":
        text = choice.get("text")
    else:
        message = choice.get("delta" if stream else "message")
        text = message.get("content") if isinstance(message, dict) else None
    return text if isinstance(text, str) else None


def answered_key(route: str, body: Any, answer: str) -> PromptKey | None:
    """The key of the request's prompt followed by `answer`, as the next turn would start; None for
    requests whose answer no later prompt extends this way (batches, token ids, echo)."""
    if not isinstance(body, dict) or not answer:
        return None
    if route == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list) or body.get("continue_final_message"):
            return None
        text = _chat_text([*messages, {"role": "assistant", "content": answer}])
        return text_key(text) if text else None
    if route == "completions" and isinstance(body.get("prompt"), str) and not body.get("echo"):
        return text_key(body["prompt"] + answer)
    return None
