"""Rule labeler: every rule kind, users' Python functions, bad rules files, the CLI stage and resuming."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from align.cli import app
from align.data.records import Candidate, CandidateSet, Judgement, content_hash
from align.data.validate import load_records
from align.errors import ConfigError
from align.label.rules import ResponseView, RuleError, load_rules
from align.label.stages import label_rules

REPO = Path(__file__).resolve().parent.parent


def write_candidates(path: Path, prompts: dict[str, tuple[object, list[str]]]) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for prompt_id, (prompt, texts) in prompts.items():
            responses = [Candidate(id=f"r{i}", text=t, finish_reason="stop", num_tokens=len(t.split()))
                         for i, t in enumerate(texts)]
            record = CandidateSet(prompt_id=prompt_id, prompt=prompt, prompt_hash=content_hash(prompt),
                                  responses=responses, teacher={"model": "test"})
            f.write(json.dumps(record.to_json()) + "\n")
    return path


def rules_file(tmp_path: Path, body: str, name: str = "rules.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body), encoding="utf-8")
    return path


def evaluate(tmp_path: Path, body: str, response: str, prompt: str = "Question?", **kwargs):  # type: ignore[no-untyped-def]
    return load_rules(rules_file(tmp_path, body)).evaluate(ResponseView(prompt, response, "p:r"), **kwargs)


# ----------------------------------------------------------------------------- users' Python functions


def test_python_function_rule_from_a_temporary_file(tmp_path: Path) -> None:
    (tmp_path / "checks.py").write_text(textwrap.dedent("""
        def positivity(prompt, response):
            return 1.0 if "glad" in response else 0.25

        def mentions_prompt_word(prompt, response):
            return prompt.split()[0].lower() in response.lower()
    """))
    body = """
        rules:
          - name: positivity
            python: checks.py:positivity
            weight: 1.0
          - name: echoes
            python: checks.py:mentions_prompt_word
          - name: short
            max_words: 40
            weight: 0.5
    """
    happy = evaluate(tmp_path, body, "Paris, glad to help.", prompt="Paris capital?")
    assert happy.rules["positivity"]["score"] == 1.0 and happy.rules["echoes"]["passed"] is True
    plain = evaluate(tmp_path, body, "It is Lyon.", prompt="Paris capital?")
    assert plain.rules["positivity"] == {"score": 0.25, "passed": False}
    assert plain.rules["echoes"]["score"] == 0.0
    # weighted mean: (0.25 * 1 + 0 * 1 + 1 * 0.5) / 2.5
    assert plain.score == pytest.approx(0.3)


def test_python_module_function_rule(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_rules_module.py").write_text("def long_enough(prompt, response):\n    return len(response) > 5\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    body = "rules:\n  - name: long\n    python: my_rules_module:long_enough\n"
    assert evaluate(tmp_path, body, "a long answer").score == 1.0


def test_raising_function_is_reported_with_rule_and_record_and_skipped(tmp_path: Path) -> None:
    (tmp_path / "checks.py").write_text("def boom(prompt, response):\n    raise ValueError('no sentiment model')\n")
    body = """
        rules:
          - name: sentiment
            python: checks.py:boom
          - name: short
            max_words: 5
    """
    seen: list[tuple[str, str, str]] = []
    result = evaluate(tmp_path, body, "fine answer", on_error=lambda *a: seen.append(a))
    assert seen == [("sentiment", "p:r", "ValueError: no sentiment model")]
    assert result.score == 1.0 and "sentiment" not in result.rules
    assert result.errors == {"sentiment": "ValueError: no sentiment model"}
    with pytest.raises(RuleError, match=r"rule 'sentiment' failed on record p:r: ValueError"):
        evaluate(tmp_path, body, "fine answer", strict=True)


def test_function_returning_a_non_number_is_an_error_not_a_score(tmp_path: Path) -> None:
    (tmp_path / "checks.py").write_text("def wrong(prompt, response):\n    return 'yes'\n")
    result = evaluate(tmp_path, "rules:\n  - name: wrong\n    python: checks.py:wrong\n", "x")
    assert result.score is None and "must return a finite float or a bool" in result.errors["wrong"]


# ----------------------------------------------------------------------------- built-in checks


def test_length_bounds_decay_outside_and_count_units(tmp_path: Path) -> None:
    body = "rules:\n  - name: short\n    max_words: 4\n    min_chars: 3\n"
    assert evaluate(tmp_path, body, "one two three four").rules["short"] == {
        "score": 1.0, "passed": True, "chars": 18, "words": 4}
    too_long = evaluate(tmp_path, body, "one two three four five six seven eight").rules["short"]
    assert too_long["score"] == 0.5 and too_long["passed"] is False
    sentences = "rules:\n  - name: s\n    max_sentences: 2\n"
    assert evaluate(tmp_path, sentences, "One. Two! Three?").rules["s"]["sentences"] == 3


def test_token_length_uses_the_rules_tokenizer(tmp_path: Path, tiny_model_dir: Path) -> None:
    body = f"tokenizer: {tiny_model_dir}\nrules:\n  - name: t\n    max_tokens: 3\n"
    result = evaluate(tmp_path, body, "Paris is the capital of France.")
    assert result.rules["t"]["tokens"] > 3 and not result.rules["t"]["passed"]
    no_tokenizer = "rules:\n  - name: t\n    max_tokens: 3\n"
    assert "tokenizer" in evaluate(tmp_path, no_tokenizer, "Paris is nice.").errors["t"]


def test_regex_keywords_refusal_repetition_format_language_json(tmp_path: Path) -> None:
    body = r"""
        rules:
          - name: no_preamble
            must_not_match: '^\W*(sure|certainly)\b'
            ignore_case: true
          - name: mentions
            must_include: [paris, france]
          - name: no_refusal
            refusal: true
            hard: true
          - name: repetition
            repetition: {n: 2, max_fraction: 0.2}
          - name: prose
            no_markdown: true
            no_lists: true
            ends_with: ".!?"
          - name: english
            language: en
    """
    good = evaluate(tmp_path, body, "Paris is the capital of France and has been for a long time.")
    assert good.label == "good" and good.score == 1.0
    preamble = evaluate(tmp_path, body, "Sure! Paris, France.")
    assert preamble.rules["no_preamble"]["passed"] is False
    half = evaluate(tmp_path, body, "It is Paris.")
    assert half.rules["mentions"]["score"] == 0.5 and half.rules["mentions"]["missing"] == ["france"]
    refusal = evaluate(tmp_path, body, "I'm sorry, but I can’t help with Paris in France.")
    assert refusal.label == "bad" and refusal.score == 0.0 and refusal.failed_hard == ["no_refusal"]
    assert evaluate(tmp_path, body, "paris paris paris paris france.").rules["repetition"]["passed"] is False
    listed = evaluate(tmp_path, body, "- **Paris**\n- France")
    assert listed.rules["prose"]["broken"] == ["markdown", "list", "ending"]
    french = evaluate(tmp_path, body, "Paris est la capitale de la France depuis très longtemps, oui vraiment.")
    assert french.rules["english"]["passed"] is False
    json_body = """
        rules:
          - name: answer_json
            json: {strip_code_fence: true, schema: {type: object, required: [answer],
                   properties: {answer: {type: string}}, additionalProperties: false}}
    """
    assert evaluate(tmp_path, json_body, '```json\n{"answer": "Paris"}\n```').rules["answer_json"]["passed"]
    wrong = evaluate(tmp_path, json_body, '{"answer": 3, "extra": 1}').rules["answer_json"]
    assert not wrong["passed"] and "$.answer: expected string" in wrong["error"] and "unexpected key" in wrong["error"]
    assert "not JSON" in evaluate(tmp_path, json_body, "Paris").rules["answer_json"]["error"]


# ----------------------------------------------------------------------------- bad rules files


@pytest.mark.parametrize("body, message", [
    ("rules:\n  - name: vibe\n    sentiment: positive\n", r"rules.yaml:3: rule 'vibe': unknown key 'sentiment'"),
    ("rules:\n  - name: vibe\n    type: sentiment\n    max_words: 3\n", r"rule 'vibe': unknown rule type 'sentiment'"),
    ("rules:\n  - name: short\n    max_wrds: 3\n", r"unknown key 'max_wrds' \(did you mean 'max_words'\?\)"),
    ("rules:\n  - name: re\n    must_match: '(unclosed'\n", r"rules.yaml:3: rule 're': bad regex '\(unclosed'"),
    ("rules:\n  - name: fn\n    python: nowhere.py:f\n", r"rule 'fn': python file 'nowhere.py' not found"),
    ("rules:\n  - name: fn\n    python: checks.py:missing\n", r"rule 'fn': no function 'missing' in checks.py"),
    ("rules:\n  - name: fn\n    python: no_such_module_xyz:f\n", r"rule 'fn': cannot import module"),
    ("rules:\n  - name: nothing\n    weight: 1\n", r"rule 'nothing': says nothing to check"),
    ("rules:\n  - name: mixed\n    max_words: 3\n    refusal: true\n", r"rule 'mixed': mixes length and refusal"),
    ("rules:\n  - name: w\n    max_words: 3\n    weight: -1\n", r"rules.yaml:4: rule 'w': weight must be a number >= 0"),
    ("rules:\n  - name: j\n    json: {schema: {type: object, oneOf: []}}\n", r"unsupported keyword 'oneOf'"),
    ("rules:\n  - name: a\n    max_words: 3\n  - name: a\n    min_words: 1\n", r"rule 'a' is defined twice"),
    ("rulez: []\n", r"unknown key 'rulez' \(did you mean 'rules'\?\)"),
    ("rules: []\n", r"expected 'rules:' with a list of rules"),
])
def test_bad_rules_files_name_the_rule_and_line(tmp_path: Path, body: str, message: str) -> None:
    (tmp_path / "checks.py").write_text("def present(prompt, response):\n    return True\n")
    with pytest.raises(ConfigError, match=message):
        load_rules(rules_file(tmp_path, body))


# ----------------------------------------------------------------------------- the stage and the CLI


@pytest.mark.reliability
def test_label_rules_cli_writes_valid_judgements_and_resumes(tmp_path: Path) -> None:
    candidates = write_candidates(tmp_path / "candidates.jsonl", {
        "p1": ("What is the capital of France?", ["Paris is the capital of France.", "Sure! **Paris**.", ""]),
        "p2": ([{"role": "user", "content": "Name a color."}], ["Blue is a color.", "I'm sorry, but I can't help."]),
    })
    out = tmp_path / "judgements.jsonl"
    runner = CliRunner()
    args = ["label", "rules", str(candidates), "--rules", str(REPO / "configs/rules/concise.yaml"), "-o", str(out),
            "--no-progress"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    assert "wrote 4 judgements" in first.output and "not judged: 1 empty" in first.output
    judgements: list[Judgement] = load_records(out, "judgements")
    by_id = {j.id: j for j in judgements}
    assert by_id["p1:r0"].score == 1.0 and by_id["p1:r0"].judge.type == "rules"
    assert set(by_id["p1:r1"].details["rules"]) >= {"no_preamble", "plain_prose", "under_50_words"}
    assert by_id["p2:r1"].label == "bad" and by_id["p2:r1"].details["failed_hard"] == ["no_refusal"]
    again = runner.invoke(app, args)
    assert "wrote 0 judgements" in again.output and "4 already there" in again.output
    assert len(out.read_text().splitlines()) == 4
    other_rules = rules_file(tmp_path, "rules:\n  - name: s\n    max_words: 3\n", "other.yaml")
    clash = runner.invoke(app, ["label", "rules", str(candidates), "--rules", str(other_rules), "-o", str(out)])
    assert clash.exit_code != 0 and "another labeler or with other settings" in str(clash.exception)


def test_label_rules_strict_stops_at_a_raising_function(tmp_path: Path) -> None:
    candidates = write_candidates(tmp_path / "c.jsonl", {"p1": ("Q?", ["An answer."])})
    (tmp_path / "checks.py").write_text("def boom(prompt, response):\n    raise RuntimeError('bad')\n")
    rules = rules_file(tmp_path, "rules:\n  - name: boom\n    python: checks.py:boom\n  - name: s\n    max_words: 9\n")
    result = label_rules(candidates, rules, tmp_path / "j.jsonl", progress=False)
    assert result.rule_errors == {"boom": 1} and result.written == 1
    assert "rule 'boom' raised on 1 records" in "\n".join(result.lines())
    with pytest.raises(RuleError, match=r"rule 'boom' failed on record p1:r0"):
        label_rules(candidates, rules, tmp_path / "strict.jsonl", strict=True, progress=False)


@pytest.mark.parametrize("name", ["concise", "default", "json", "polite"])
def test_shipped_rules_files_load(name: str) -> None:
    assert load_rules(REPO / "configs" / "rules" / f"{name}.yaml").rules


def test_concise_rules_prefer_the_concise_direct_answer() -> None:
    ruleset = load_rules(REPO / "configs/rules/concise.yaml")

    def score(text: str) -> float | None:
        return ruleset.evaluate(ResponseView("Why is the sky blue?", text, "x")).score

    direct = score("Air scatters blue sunlight more than red light, so the sky looks blue.")
    assert direct == 1.0
    assert score("Certainly! Air scatters blue light more than red light.") < direct  # type: ignore[operator]
    assert score("1. Scattering\n2. Wavelength") < direct  # type: ignore[operator]
    assert score(" ".join(["Light scatters in the air."] * 3) + " " + "It is blue because " * 10 + "of scattering.") \
        < direct  # type: ignore[operator]
    assert score("As an AI, I cannot answer that.") == 0.0
