"""Template parity between student and teacher: the real bundled SmolLM2 tokenizer (loaded alone from
the safetensors cache, ~2 s once converted), copies of it with edited chat templates, and small
WordLevel tokenizers built with `tokenizers` for vocabulary mismatches."""

import copy

import pytest

from hpcdistill.errors import ModelError
from hpcdistill.models.chat import multi_turn, single_turn
from hpcdistill.models.loading import bundled_gguf_path, converted_gguf_dir
from hpcdistill.models.parity import DEFAULT_PROBE_REPLY, check_template_parity

STUDENT = "bundled:smollm2-135m-instruct"
TEACHER = "/models/other-teacher"

# SmolLM2's ChatML template, with the assistant turn written differently in each variant.
_CHATML = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\\n' }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ ASSISTANT }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
PLAIN_ASSISTANT = "'<|im_start|>assistant\\n' + message['content'] + '<|im_end|>\\n'"
# Qwen3-style: the last assistant turn gets an empty reasoning block the student never writes.
THINK_ASSISTANT = ("'<|im_start|>assistant\\n' + ('<think>\\n\\n</think>\\n\\n' if loop.last else '')"
                   " + message['content'] + '<|im_end|>\\n'")
ENDOFTEXT_ASSISTANT = "'<|im_start|>assistant\\n' + message['content'] + '<|endoftext|>\\n'"
# The generation prompt says "assistant", the written turn says "model": prompt is not a prefix.
RENAMED_ASSISTANT = "'<|im_start|>model\\n' + message['content'] + '<|im_end|>\\n'"


def chatml(assistant: str) -> str:
    return _CHATML.replace("ASSISTANT", assistant)


@pytest.fixture(scope="module")
def smol():
    from transformers import AutoTokenizer

    name = STUDENT.split(":", 1)[1]
    return AutoTokenizer.from_pretrained(str(converted_gguf_dir(bundled_gguf_path(name), name)))


def with_template(tokenizer, template):
    other = copy.deepcopy(tokenizer)
    other.chat_template = template
    return other


def word_level(vocab: dict[str, int], chat_template: str, unk: str = "<unk>"):
    """A whitespace-split WordLevel tokenizer with ChatML special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(vocab, unk_token=unk))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token=unk, eos_token="<|im_end|>")
    tok.chat_template = chat_template
    return tok


STUDENT_MESSAGES = single_turn("What is 2+3?")
# The regen teacher's context: its own system prompt, the prior attempt and feedback.
TEACHER_MESSAGES = multi_turn(["What is 2+3?", "It is 6.", "Wrong: recheck the sum."],
                              system_prompt="You are a careful teacher.")


def check(student_tok, teacher_tok, **kwargs):
    check_template_parity(student_tok, teacher_tok, STUDENT_MESSAGES, TEACHER_MESSAGES,
                          student_name=STUDENT, teacher_name=TEACHER, **kwargs)


def test_probe_reply_mixes_prose_code_and_newlines():
    assert "```" in DEFAULT_PROBE_REPLY and DEFAULT_PROBE_REPLY.count("\n") >= 3


def test_same_tokenizer_with_different_contexts_passes(smol):
    assert check(smol, smol) is None
    # Two objects of the same tokenizer and template go through the vocabulary checks too.
    assert check(smol, copy.deepcopy(smol)) is None
    # A template rewritten but writing the reply identically is fine.
    assert check(smol, with_template(smol, chatml(PLAIN_ASSISTANT))) is None


def test_teacher_template_inserting_an_empty_think_block_is_refused(smol):
    with pytest.raises(ModelError) as err:
        check(smol, with_template(smol, chatml(THINK_ASSISTANT)))
    msg = str(err.value)
    assert "parity" in msg and STUDENT in msg and TEACHER in msg
    # SmolLM2 has no <think> token: the block is written as '<' 'think' '>' ...
    assert "reply token 0:" in msg and "teacher '<' 'think' '>'" in msg and "student 'Let'" in msg
    assert "chat template" in msg and len(msg) < 600
    # The other way round too: the student's template is the odd one.
    with pytest.raises(ModelError, match="parity"):
        check(with_template(smol, chatml(THINK_ASSISTANT)), smol)


def test_teacher_template_with_another_end_of_turn_token_is_refused(smol):
    with pytest.raises(ModelError) as err:
        check(smol, with_template(smol, chatml(ENDOFTEXT_ASSISTANT)))
    msg = str(err.value)
    assert STUDENT in msg and TEACHER in msg and "'<|im_end|>'" in msg and "'<|endoftext|>'" in msg
    # The first difference is the end-of-turn token, right after the reply text.
    n_text = len(smol.encode(DEFAULT_PROBE_REPLY, add_special_tokens=False))
    assert f"reply token {n_text}:" in msg


def test_teacher_with_another_vocabulary_is_refused(smol):
    words = ["<unk>", "<|im_start|>", "<|im_end|>", "system", "user", "assistant", "Let", "me"]
    teacher = word_level({w: i for i, w in enumerate(words)}, smol.chat_template)
    with pytest.raises(ModelError) as err:
        check(smol, teacher)
    msg = str(err.value)
    assert "vocabular" in msg and "tokenizer mismatch" in msg and STUDENT in msg and TEACHER in msg
    assert "reply token 0:" in msg and "student 'Let'" in msg and "teacher (no id " in msg
    assert len(msg) < 600


def test_teacher_with_the_same_vocabulary_but_another_split_is_refused(smol):
    # Same id -> token table as the student, so ids name the same tokens; but whitespace-split
    # WordLevel encodes the same text into other ids.
    teacher = word_level(smol.get_vocab(), smol.chat_template, unk=smol.unk_token)
    ids = smol.encode(DEFAULT_PROBE_REPLY, add_special_tokens=False)
    assert teacher.convert_ids_to_tokens(ids) == smol.convert_ids_to_tokens(ids)
    with pytest.raises(ModelError, match="split the same text into different ids"):
        check(smol, teacher)


def test_template_that_does_not_extend_its_own_prompt_is_refused(smol):
    with pytest.raises(ModelError) as err:
        check(smol, with_template(smol, chatml(RENAMED_ASSISTANT)))
    msg = str(err.value)
    assert "parity" in msg and f"chat template of the teacher ({TEACHER})" in msg and "prefix" in msg
    assert "prompt 'ass' 'istant'" in msg and "conversation 'model'" in msg


def test_tokenizer_without_chat_template_is_refused(smol):
    with pytest.raises(ModelError, match="no chat template"):
        check(smol, with_template(smol, None))
