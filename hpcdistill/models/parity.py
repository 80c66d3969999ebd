"""Template parity: a check, run before a distillation run starts, that the student and the teacher
would write the same assistant reply as the same token ids.

Why (seed 000, "Position alignment"): the student is scored on (prompt_s + s) and the teacher on
(prompt_t + s), the SAME response ids, position by position. That is only valid if (a) both
tokenizers give those ids the same meaning, and (b) each side's chat template writes an assistant
reply after its own rendered prompt as exactly those ids: same end-of-turn token, no extra tokens
(e.g. the empty `<think>\n\n</think>\n\n` block Qwen3's template inserts into the last assistant
turn), no other special tokens. Otherwise the teacher's log-probs are read at the wrong positions,
silently. The check renders a probe reply on both sides and compares; a mismatch raises ModelError.
"""

from __future__ import annotations

from typing import Any

from hpcdistill.errors import ModelError
from hpcdistill.models.chat import Message, render_prompt

# Prose, a code block and newlines, so that newline / code tokens are exercised.
DEFAULT_PROBE_REPLY = "Let me check.\n```python\nprint(1)\n```\nThe answer is 1."
_FIX = "use a teacher with the student's tokenizer and chat template"
_SHOW = 4  # tokens shown on each side from the first difference


def _reply_ids(tokenizer: Any, messages: list[Message], probe_reply: str, side: str) -> list[int]:
    """Ids the template writes for the assistant's `probe_reply` after the rendered prompt, without
    trailing whitespace after the end-of-turn token (as `chat.render_response`, but never falling
    back to plain encoding: a template that does not extend its own prompt is itself a misalignment)."""
    prompt = render_prompt(tokenizer, messages, add_generation_prompt=True)
    full = render_prompt(tokenizer, messages + [{"role": "assistant", "content": probe_reply}],
                         add_generation_prompt=False)
    if (at := _first_difference(prompt, full[:len(prompt)])) is not None:
        raise ModelError(
            f"template parity: the chat template of the {side} does not render the prompt (with the "
            f"generation prompt) as a prefix of the conversation with the reply, so its reply "
            f"tokens cannot be located; first difference at prompt token {at}: prompt "
            f"{_tokens(tokenizer, prompt, at)} vs conversation {_tokens(tokenizer, full, at)}; {_FIX}")
    reply = full[len(prompt):]
    while reply and tokenizer.decode(reply[-1:]).strip() == "":
        reply = reply[:-1]
    return reply


def _tokens(tokenizer: Any, ids: list[int], start: int) -> str:
    """Up to _SHOW tokens of `ids` from `start`, as the tokenizer names them, for an error message."""
    names = [_token_name(tokenizer, i) for i in ids[start:start + _SHOW]]
    text = " ".join(f"(no id {i})" if n is None else repr(n)
                    for i, n in zip(ids[start:], names)) or "(end)"
    return text[:120] + ("..." if len(ids) > start + _SHOW or len(text) > 120 else "")


def _token_name(tokenizer: Any, token_id: int) -> str | None:
    try:
        return tokenizer.convert_ids_to_tokens(int(token_id))
    except (IndexError, KeyError, OverflowError, ValueError):  # id outside this vocabulary
        return None


def _first_difference(a: list, b: list) -> int | None:
    at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return None if at == len(a) == len(b) else at


def check_template_parity(student_tokenizer: Any, teacher_tokenizer: Any,
                          student_messages: list[Message], teacher_messages: list[Message], *,
                          student_name: str, teacher_name: str,
                          probe_reply: str = DEFAULT_PROBE_REPLY) -> None:
    """Raise ModelError if the teacher would read the student's reply ids at misaligned positions
    (or with another meaning); return None otherwise. Messages: each side's prompt for one problem."""
    sides = f"the student ({student_name}) and the teacher ({teacher_name})"
    student = _reply_ids(student_tokenizer, student_messages, probe_reply, f"student ({student_name})")
    teacher = _reply_ids(teacher_tokenizer, teacher_messages, probe_reply, f"teacher ({teacher_name})")

    def fail(what: str, s_ids: list[int], t_ids: list[int], at: int, unit: str) -> None:
        raise ModelError(
            f"template parity: {sides} {what}, so teacher log-probs would be read at the wrong "
            f"positions; first difference at {unit} {at}: student "
            f"{_tokens(student_tokenizer, s_ids, at)} vs teacher {_tokens(teacher_tokenizer, t_ids, at)}"
            f"; {_FIX}")

    if student_tokenizer is not teacher_tokenizer:
        # (a) the same ids mean the same tokens: name the student's reply ids in both vocabularies.
        s_names = [_token_name(student_tokenizer, i) for i in student]
        t_names = [_token_name(teacher_tokenizer, i) for i in student]
        if (at := _first_difference(s_names, t_names)) is not None:
            fail("have different vocabularies (tokenizer mismatch: the same id names different "
                 "tokens)", student, student, at, "reply token")
        # ... and the same text is split into the same ids.
        s_plain = list(student_tokenizer.encode(probe_reply, add_special_tokens=False))
        t_plain = list(teacher_tokenizer.encode(probe_reply, add_special_tokens=False))
        if (at := _first_difference(s_plain, t_plain)) is not None:
            fail("split the same text into different ids (tokenizer mismatch)", s_plain, t_plain, at,
                 "plain-text token")
    # (b) each template writes the reply, after its own prompt, as the same ids.
    if (at := _first_difference(student, teacher)) is not None:
        fail("would write the same reply as different tokens (their chat templates differ)",
             student, teacher, at, "reply token")


__all__ = ["DEFAULT_PROBE_REPLY", "check_template_parity"]
