"""Teacher contexts (DESIGN.md section 2, stage 3): what the teacher sees before the response.

- feedback: the problem and the feedback f; scored on the student's attempt s (SDPO).
- regen: the problem, the student's attempt s and f; the teacher writes s' and is scored on s'
  (seed 000, "SDPO w/ Regeneration").
- system_prompt: the problem under an enhanced system prompt (context distillation, seed 004).
- none: the student's own prompt.
Templates are spec values (`[teacher]`), not code.
"""

from __future__ import annotations

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
