"""The three labeling tasks as Argilla datasets: their fields, questions and guidelines.

* ``pairwise``: a prompt and two responses; "which is better?" (A / B / tie /
  both bad) plus an optional rationale. DPO pairs come from it.
* ``single``: a prompt and one response; good or bad (KTO's desirable flag).
* ``ranking``: a prompt and N > 2 responses, ranked best (1) to worst.

Everything that ties a record back to align's files (prompt id, response
ids, the prompt as given) rides along in the record's metadata, so ``pull``
needs nothing but the dataset.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from align import extras

if TYPE_CHECKING:
    import argilla as rg

TASKS: tuple[str, ...] = ("pairwise", "single", "ranking")

PREFERENCE, QUALITY, RANKING, RATIONALE = "preference", "quality", "ranking", "rationale"
PAIR_LABELS = {"a": "A is better", "b": "B is better", "tie": "Tie (equally good)", "both_bad": "Both bad"}
QUALITY_LABELS = {"good": "Good", "bad": "Bad"}
# Metadata key holding align's provenance; a leading underscore keeps it out of annotators' view.
ALIGN_METADATA = "_align"

GUIDELINES = {
    "pairwise": (
        "# Which response is better?\n\n"
        "Read the prompt and both responses. Pick **A** or **B** for the one that answers the prompt better: "
        "correct first, then helpful and clear; length is not a merit in itself.\n\n"
        "* **Tie**: both are good and you cannot prefer one.\n"
        "* **Both bad**: neither is acceptable (wrong, unsafe, off-topic, empty).\n\n"
        "The suggestion shown (if any) comes from an automatic labeler: check it, don't trust it. "
        "A short rationale helps when the choice was hard."),
    "single": (
        "# Is this response good?\n\n"
        "Read the prompt and the response. **Good**: correct, helpful and clear; you would be glad to receive "
        "it. **Bad**: wrong, unhelpful, unsafe, off-topic or empty.\n\n"
        "The suggestion shown (if any) comes from an automatic labeler: check it, don't trust it."),
    "ranking": (
        "# Rank the responses\n\n"
        "Read the prompt and every response, then order them from best (1) to worst: correct first, then "
        "helpful and clear; length is not a merit in itself. Give two responses the same rank only when you "
        "truly cannot prefer one.\n\n"
        "The suggestion shown (if any) comes from an automatic labeler: check it, don't trust it."),
}


def response_field(task: str, index: int) -> str:
    """The field holding the ``index``-th response (0-based) of a record."""
    if task == "pairwise":
        return ("response_a", "response_b")[index]
    if task == "single":
        return "response"
    return f"response_{index + 1}"


def main_question(task: str) -> str:
    return {"pairwise": PREFERENCE, "single": QUALITY, "ranking": RANKING}[task]


def dataset_settings(task: str, *, responses: int, min_submitted: int = 1,
                     guidelines: str | None = None) -> rg.Settings:
    """The dataset's settings; ``responses`` is the number of responses per record (ranking only)."""
    rg = extras.argilla()
    count = {"pairwise": 2, "single": 1}.get(task, responses)
    fields = [rg.TextField(name="prompt", title="Prompt", use_markdown=True)]
    titles = {"pairwise": ["Response A", "Response B"], "single": ["Response"]}.get(task) \
        or [f"Response {i + 1}" for i in range(count)]
    for i, title in enumerate(titles):
        fields.append(rg.TextField(name=response_field(task, i), title=title, use_markdown=True))
    if task == "pairwise":
        question: Any = rg.LabelQuestion(name=PREFERENCE, title="Which response is better?", labels=PAIR_LABELS)
    elif task == "single":
        question = rg.LabelQuestion(name=QUALITY, title="Is the response good?", labels=QUALITY_LABELS)
    else:
        question = rg.RankingQuestion(name=RANKING, title="Rank the responses, best first",
                                      values={response_field(task, i): f"Response {i + 1}" for i in range(count)})
    rationale = rg.TextQuestion(name=RATIONALE, title="Why? (optional)", required=False)
    return rg.Settings(
        guidelines=guidelines or GUIDELINES[task],
        fields=fields,
        questions=[question, rationale],
        metadata=[rg.TermsMetadataProperty(name="prompt_id", title="Prompt id", visible_for_annotators=False)],
        allow_extra_metadata=True,
        distribution=rg.TaskDistribution(min_submitted=min_submitted),
    )


def describe(settings: rg.Settings) -> dict[str, Any]:
    """What an answer depends on: fields and questions (names, types, options), for comparing datasets."""
    def options(question: Any) -> Any:
        for attr in ("labels", "values"):
            value = getattr(question, attr, None)
            if value:
                return sorted(value) if isinstance(value, (list, dict)) else value
        return None

    return {
        "fields": [f.name for f in settings.fields],
        "questions": {q.name: {"type": type(q).__name__, "options": options(q), "required": q.required}
                      for q in settings.questions},
    }


def differences(expected: rg.Settings, found: rg.Settings) -> list[str]:
    """Human-readable differences between two datasets' fields and questions (empty when compatible)."""
    want, have = describe(expected), describe(found)
    out = []
    if want["fields"] != have["fields"]:
        out.append(f"fields: dataset has {have['fields']}, this push needs {want['fields']}")
    for name in sorted(set(want["questions"]) | set(have["questions"])):
        w, h = want["questions"].get(name), have["questions"].get(name)
        if w == h:
            continue
        if h is None:
            out.append(f"question '{name}': missing from the dataset (this push needs {w['type']} {w['options']})")
        elif w is None:
            out.append(f"question '{name}': in the dataset ({h['type']} {h['options']}) but not in this push")
        else:
            changed = ", ".join(f"{k} {h[k]} -> {w[k]}" for k in w if w[k] != h[k])
            out.append(f"question '{name}': {changed}")
    return out
