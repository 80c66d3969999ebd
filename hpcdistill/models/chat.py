"""Chat prompts rendered with the tokenizer's own chat template.

Messages are `{"role": "system"|"user"|"assistant", "content": str}` dicts. Rendering goes through
text (`tokenize=False`) and then `encode(..., add_special_tokens=False)`: the template already
writes every special token it wants, and the text path returns a plain `list[int]` on every
transformers version (transformers 5 returns a BatchEncoding from `tokenize=True`).

Note: some templates (SmolLM2's among them) insert a default system prompt when the first message
is not a system message; pass `system_prompt` explicitly to control it.

Template variables of a run (`model.enable_thinking`: Qwen3's thinking switch) travel on the
tokenizer: `set_chat_options(tokenizer, enable_thinking=False)` once after loading, and every
render of that tokenizer passes them to `apply_chat_template`. A template that does not read a
variable ignores it (jinja leaves unused variables alone).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hpcdistill.errors import ModelError

Message = dict[str, str]


def single_turn(user_text: str, system_prompt: str | None = None) -> list[Message]:
    """[system?, user]."""
    return multi_turn([user_text], system_prompt)


def multi_turn(turns: Sequence[str], system_prompt: str | None = None) -> list[Message]:
    """[system?, user, assistant, user, ...]: turns alternate starting with the user.

    E.g. the regen teacher context of seed 000: multi_turn([problem, prior_attempt, feedback]).
    """
    roles = ("user", "assistant")
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return messages + [{"role": roles[i % 2], "content": text} for i, text in enumerate(turns)]


CHAT_OPTIONS = "_hpcdistill_chat_options"  # the tokenizer attribute holding the template variables


def set_chat_options(tokenizer: Any, *, enable_thinking: bool | None = None) -> None:
    """Template variables every later render of `tokenizer` passes; None = the template's default
    (the variable is not passed at all)."""
    if tokenizer is None:
        return
    options = {"enable_thinking": enable_thinking}
    setattr(tokenizer, CHAT_OPTIONS, {k: v for k, v in options.items() if v is not None})


def render_text(tokenizer: Any, messages: list[Message], add_generation_prompt: bool = True) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise ModelError(f"tokenizer {getattr(tokenizer, 'name_or_path', tokenizer)!r} has no chat "
                         "template; use an instruct/chat model")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                         **getattr(tokenizer, CHAT_OPTIONS, {}))


def render_prompt(tokenizer: Any, messages: list[Message], add_generation_prompt: bool = True) -> list[int]:
    """Token ids of `messages` rendered with the chat template (ending with the assistant header
    when `add_generation_prompt`)."""
    text = render_text(tokenizer, messages, add_generation_prompt)
    return list(tokenizer.encode(text, add_special_tokens=False))


def render_response(tokenizer: Any, messages: list[Message], response_text: str) -> list[int]:
    """Token ids of an assistant reply to `messages`, as the template writes it (with its
    end-of-turn token): for scoring or training on a completion that was not sampled here
    (off-policy distillation). Falls back to plain encoding + eos when the template does not
    render the prompt as a prefix of the full conversation.
    """
    prompt = render_prompt(tokenizer, messages, add_generation_prompt=True)
    full = render_prompt(tokenizer, messages + [{"role": "assistant", "content": response_text}],
                         add_generation_prompt=False)
    if full[:len(prompt)] == prompt:
        response = full[len(prompt):]
        # Drop a trailing newline after the end-of-turn token: it is not something the model
        # samples before stopping.
        while response and tokenizer.decode(response[-1:]).strip() == "":
            response = response[:-1]
        return response
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    return list(tokenizer.encode(response_text, add_special_tokens=False)) + eos


__all__ = ["Message", "single_turn", "multi_turn", "render_text", "render_prompt", "render_response",
           "set_chat_options"]
