"""Teacher contexts (DESIGN.md section 2, stage 3): what the teacher sees before the response.

- feedback: the problem and the feedback f; scored on the student's attempt s (SDPO).
- regen: the problem, the student's attempt s and f; the teacher writes s' and is scored on s'
  (seed 000, "SDPO w/ Regeneration").
- system_prompt: the problem under an enhanced system prompt (context distillation, seed 004).
- demonstration: the problem and a successful sibling rollout of the same problem, optionally the
  feedback (SDPO's reprompting: "correct solution" from another sample); scored on s.
- none: the student's own prompt.
Templates are spec values (`[teacher]`), not code; the loader checks their fields.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from hpcdistill.spec.schema import TeacherSpec
from hpcdistill.tasks import Problem, Verdict

Messages = list[dict[str, str]]


def _with_system(system_prompt: str, messages: Messages) -> Messages:
    return ([{"role": "system", "content": system_prompt}] if system_prompt else []) + messages


def student_messages(problem: Problem, system_prompt: str = "") -> Messages:
    return _with_system(system_prompt, [{"role": "user", "content": problem.prompt}])


def feedback_messages(problem: Problem, verdict: Verdict, teacher: TeacherSpec) -> Messages:
    text = teacher.feedback_template.format(problem=problem.prompt, feedback=verdict.feedback)
    return _with_system(teacher.system_prompt, [{"role": "user", "content": text}])


def regen_messages(problem: Problem, attempt: str, verdict: Verdict, teacher: TeacherSpec) -> Messages:
    followup = teacher.regen_template.format(problem=problem.prompt, feedback=verdict.feedback)
    return _with_system(teacher.system_prompt, [
        {"role": "user", "content": problem.prompt},
        {"role": "assistant", "content": attempt},
        {"role": "user", "content": followup},
    ])


def system_prompt_messages(problem: Problem, teacher: TeacherSpec) -> Messages:
    return _with_system(teacher.system_prompt, [{"role": "user", "content": problem.prompt}])


def teacher_messages(problem: Problem, attempt: str, verdict: Verdict, teacher: TeacherSpec,
                     student_system_prompt: str = "") -> Messages:
    """The teacher's prompt for scoring the student's attempt (not regen: that one generates)."""
    if teacher.context in ("feedback", "regen"):
        return feedback_messages(problem, verdict, teacher)
    if teacher.context == "system_prompt":
        return system_prompt_messages(problem, teacher)
    return student_messages(problem, student_system_prompt)


@dataclass(frozen=True)
class TeacherContext:
    """The teacher's prompt for one rollout, and what it was built from."""

    messages: Messages
    demonstration: int = -1  # sample index of the sibling shown as a demonstration, -1 = none
    has_signal: bool = True  # False: nothing to teach from (no demonstration, no feedback)


_THINKING = re.compile(r"<think>.*?</think>\s*", flags=re.DOTALL)


def demonstration_contexts(problem: Problem, texts: list[str], verdicts: list[Verdict], teacher: TeacherSpec,
                           student_system_prompt: str = "") -> list[TeacherContext]:
    """SDPO's reprompting for the rollouts of one problem (texts[j], verdicts[j]: sample j).

    Rollout i is shown the first sibling j (in sample order) with reward >= demonstration_threshold,
    j != i when demonstration_exclude_self, with its thinking block removed; and its own feedback
    when demonstration_feedback is "always", or "fallback" and no sibling succeeded. A rollout with
    neither keeps the student's prompt and has_signal = False (SDPO's self-distillation mask).
    """
    successes = [j for j, v in enumerate(verdicts) if v.reward >= teacher.demonstration_threshold]
    out = []
    for i, verdict in enumerate(verdicts):
        shown = next((j for j in successes if not (teacher.demonstration_exclude_self and j == i)), -1)
        feedback = (teacher.demonstration_feedback == "always"
                    or (teacher.demonstration_feedback == "fallback" and shown < 0)) and bool(verdict.feedback.strip())
        if shown < 0 and not feedback:
            out.append(TeacherContext(student_messages(problem, student_system_prompt), -1, False))
            continue
        demonstration = teacher.demonstration_section.format(
            demonstration=_THINKING.sub("", texts[shown]).strip()) if shown >= 0 else ""
        feedback_text = teacher.feedback_section.format(feedback=verdict.feedback) if feedback else ""
        text = teacher.demonstration_template.format(problem=problem.prompt, demonstration=demonstration,
                                                     feedback=feedback_text)
        out.append(TeacherContext(_with_system(teacher.system_prompt, [{"role": "user", "content": text}]),
                                  shown, True))
    return out


def teacher_contexts(problems: list[Problem], texts: list[str], verdicts: list[Verdict], teacher: TeacherSpec,
                     student_system_prompt: str = "") -> list[TeacherContext]:
    """The teacher's prompt for each rollout (rollouts of one problem next to each other, in sample
    order: `problems[i]` is rollout i's problem)."""
    if teacher.context != "demonstration":
        return [TeacherContext(teacher_messages(p, text, v, teacher, student_system_prompt))
                for p, text, v in zip(problems, texts, verdicts)]
    out: list[TeacherContext] = []
    start = 0
    while start < len(problems):
        end = start
        while end < len(problems) and problems[end].problem_id == problems[start].problem_id:
            end += 1
        out += demonstration_contexts(problems[start], texts[start:end], verdicts[start:end], teacher,
                                      student_system_prompt)
        start = end
    return out
