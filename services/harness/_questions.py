"""A session's open questions to its users: the first valid answer wins, later ones are told who won."""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from dataclasses import dataclass, field

from devsilo.protocol import AskUserQuestionInput, InputRefused, QuestionAnswer
from pydantic import ValidationError

CLOSED_KEPT = 256
"""Answered or cancelled questions remembered, so a late answer is told who won."""


@dataclass(frozen=True)
class Answer:
    """The answer that won a question."""

    client: str
    selected: tuple[str, ...]
    text: str | None


@dataclass
class OpenQuestion:
    """A question waiting for its first valid answer."""

    id: str
    spec: AskUserQuestionInput
    future: asyncio.Future[Answer] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class QuestionBoard:
    """The questions a session has asked; ``answer`` is called for each client's answer, in arrival order."""

    def __init__(self) -> None:
        self._open: dict[str, OpenQuestion] = {}
        self._closed: OrderedDict[str, str] = OrderedDict()
        self._count = 0

    def ask(self, spec: AskUserQuestionInput) -> OpenQuestion:
        """Open a question; its id is ``q1``, ``q2``, ... in the session."""
        self._count += 1
        question = OpenQuestion(f"q{self._count}", spec)
        self._open[question.id] = question
        return question

    def cancel(self, qid: str) -> None:
        """Close a question nobody answered (its turn was interrupted)."""
        if self._open.pop(qid, None) is not None:
            self._close(qid, "cancelled")

    def answer(self, qid: str | None, client: str, raw: str) -> Answer:
        """Take ``client``'s answer (JSON of QuestionAnswer) if it is the first valid one.

        Raises InputRefused: ``question_closed`` naming who answered first, ``unknown_question``,
        or ``invalid_answer`` saying what is wrong (that answer does not win).
        """
        if not qid:
            raise InputRefused("invalid_answer", "an answer needs the question's id")
        question = self._open.get(qid)
        if question is not None and question.future.done():  # its turn is being interrupted
            self.cancel(qid)
            question = None
        if question is None:
            how = self._closed.get(qid)
            if how == "cancelled":
                raise InputRefused("question_closed", f"question {qid} was cancelled (the turn was interrupted)")
            if how is not None:
                raise InputRefused("question_closed", f"question {qid} was already answered by {how}")
            raise InputRefused("unknown_question", f"this session has no question {qid}")
        try:
            parsed = QuestionAnswer.model_validate_json(raw)
        except ValidationError as exc:
            raise InputRefused("invalid_answer", f"answer to {qid} is malformed: "
                                                 f"{exc.errors()[0].get('msg')}") from None
        check_answer(qid, question.spec, parsed)
        won = Answer(client=client or "a client", selected=parsed.selected, text=parsed.text)
        del self._open[qid]
        self._close(qid, won.client)
        question.future.set_result(won)
        return won

    def _close(self, qid: str, how: str) -> None:
        self._closed[qid] = how
        while len(self._closed) > CLOSED_KEPT:
            self._closed.popitem(last=False)


def check_answer(qid: str, spec: AskUserQuestionInput, answer: QuestionAnswer) -> None:
    """Raise InputRefused (``invalid_answer``) unless ``answer`` fits the question ``spec``."""
    labels = [o.label for o in spec.options]
    unknown = [s for s in answer.selected if s not in labels]
    if unknown:
        raise InputRefused("invalid_answer", f"{unknown[0]!r} is not an option of question {qid}; "
                                             f"options: {', '.join(labels) or 'none (free text only)'}")
    if len(set(answer.selected)) != len(answer.selected):
        raise InputRefused("invalid_answer", f"an option of question {qid} was picked twice")
    if len(answer.selected) > 1 and not spec.multi_select:
        raise InputRefused("invalid_answer", f"question {qid} takes one option, not {len(answer.selected)}")
    has_text = bool(answer.text and answer.text.strip())
    if has_text and not spec.allow_free_text:
        raise InputRefused("invalid_answer", f"question {qid} does not take free text; pick from its options")
    if not answer.selected and not has_text:
        what = "an option or free text" if spec.allow_free_text else "an option"
        raise InputRefused("invalid_answer", f"an answer to question {qid} needs {what}")
