"""One rendering of a prompt into token ids for every stage (align.models.tokens), with or without a chat
template, and one ``eos_token_ids``."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from align.models import eos_token_ids, load_tokenizer, prompt_token_ids
from align.models import tokens as tokens_module

REPO = Path(__file__).resolve().parent.parent
CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def untemplated_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with its chat template taken away: a base model, as far as prompts go."""
    out = tmp_path_factory.mktemp("untemplated") / "model"
    shutil.copytree(tiny_model_dir, out)
    (out / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((out / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    assert not load_tokenizer(str(out)).chat_template
    return out


def test_a_chat_prompt_ends_where_the_answer_starts_whatever_form_it_comes_in(tiny_model_dir: Path) -> None:
    from align.data.records import Message

    tokenizer = load_tokenizer(str(tiny_model_dir))
    ids = prompt_token_ids(tokenizer, "hi")
    assert tokenizer.decode(ids).endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert prompt_token_ids(tokenizer, [{"role": "user", "content": "hi"}]) == ids
    # A record's extra fields are not the prompt: every stage sees role and content only.
    assert prompt_token_ids(tokenizer, [Message(role="user", content="hi", name="ann")]) == ids


def test_a_model_without_a_chat_template_reads_plain_text_and_is_warned_about_once(
        untemplated_model_dir: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tokens_module, "_warned_plain_text", set())
    tokenizer = load_tokenizer(str(untemplated_model_dir))
    with caplog.at_level(logging.WARNING, logger="align.models.tokens"):
        ids = prompt_token_ids(tokenizer, CONVERSATION)
        assert prompt_token_ids(tokenizer, CONVERSATION) == ids
    assert ids == tokenizer("Be brief.\n\nName a colour.")["input_ids"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(untemplated_model_dir) in warnings[0] and "no chat template" in warnings[0]


@pytest.mark.parametrize("templated", [True, False])
def test_generation_distillation_and_the_judge_give_a_prompt_the_same_ids(
        templated: bool, tiny_model_dir: Path, untemplated_model_dir: Path) -> None:
    from align.generate.backends.transformers import TransformersEngine
    from align.generate.plan import teacher_messages
    from align.label.judge import LocalBackend
    from align.train.distill.tokens import chat_prompt_ids

    model = str(tiny_model_dir if templated else untemplated_model_dir)
    engine, judge = TransformersEngine(model, num_threads=1), LocalBackend(model)
    system, prompt = CONVERSATION[0]["content"], CONVERSATION[1]["content"]
    generated = engine.encode(teacher_messages(prompt, system))
    assert generated == chat_prompt_ids(engine.tokenizer, prompt, system) == judge._encode(CONVERSATION)
    assert generated == prompt_token_ids(engine.tokenizer, CONVERSATION)


def test_eval_scores_a_model_without_a_chat_template_on_the_ids_it_sampled_from(
        untemplated_model_dir: Path, tmp_path: Path) -> None:
    """Eval samples through generation and scores the samples again for KL: both must read the same prompt ids.

    The sampler's own log-probs (stored with each answer) equal a re-scoring on prompt_token_ids' ids."""
    from align.data.validate import read_records
    from align.eval import EvalConfig, run_eval
    from align.eval.logprobs import completion_logprobs
    from align.models import load_model

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(line + "\n" for line in (REPO / "datasets/prompts/concise_heldout.jsonl")
                               .read_text().splitlines()[:3]))
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules:\n  - name: short\n    max_chars: 60\n")
    model = str(untemplated_model_dir)
    result = run_eval(EvalConfig(model=model, reference=model, prompts=prompts, output_dir=tmp_path / "eval",
                                 judge=rules, max_new_tokens=6, batch_size=4))
    assert abs(result.metrics["kl_per_token"]) < 1e-4  # a model against itself

    tokenizer = load_tokenizer(model)
    rows = list(read_records(tmp_path / "eval" / "responses_model.jsonl", "candidates"))
    prompt_ids = [prompt_token_ids(tokenizer, row.prompt) for row in rows]
    answers = [[t["token_id"] for t in row.responses[0].logprobs] for row in rows]
    rescored = completion_logprobs(load_model(model), prompt_ids, answers)
    for row, (total, _) in zip(rows, rescored):
        assert total == pytest.approx(sum(t["logprob"] for t in row.responses[0].logprobs), abs=1e-3)


def test_eos_token_ids_joins_the_generation_config_and_the_tokenizer(tiny_model_dir: Path) -> None:
    from transformers import GenerationConfig

    tokenizer = load_tokenizer(str(tiny_model_dir))
    end_of_text = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    both = GenerationConfig(eos_token_id=[end_of_text, tokenizer.eos_token_id])
    assert eos_token_ids(both, tokenizer) == sorted({end_of_text, tokenizer.eos_token_id})

    class Model:  # anything with a generation_config, as a loaded model has
        generation_config = GenerationConfig(eos_token_id=end_of_text)

    assert eos_token_ids(Model(), tokenizer) == sorted({end_of_text, tokenizer.eos_token_id})
    assert eos_token_ids(GenerationConfig(), tokenizer) == [tokenizer.eos_token_id]
