"""The generate stage with the transformers backend: records, flags, log-probs, determinism, resuming."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from align.data.validate import read_records
from align.errors import AlignError, ConfigError, DataError
from align.generate import GenerateConfig, generate
from align.generate.backends import Completion
from align.generate.config import SamplingParams
from align.generate.decode import RowRequest, generate_rows, sample_tokens
from align.generate.plan import build_job, teacher_messages
from align.generate.stage import build_candidates, read_prompts

PROMPTS = [
    {"id": "p1", "prompt": "Why is the sky blue?"},
    {"id": "p2", "prompt": "Name a prime number and say why it is prime, in one sentence please."},
    {"id": "p3", "prompt": [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hi!"}]},
    {"id": "p4", "prompt": "What is 2 + 2?"},
    {"id": "p5", "prompt": "Tell me about tides."},
]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture()
def prompts_file(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)


def config(tiny_model_dir: Path, prompts: Path, output: Path, **settings) -> GenerateConfig:
    # top_p=1: the random tiny model's near-uniform distribution would make every nucleus the whole vocabulary.
    base = dict(model=str(tiny_model_dir), prompts=prompts, output=output, num_candidates=3, max_new_tokens=8,
                top_p=1.0, progress=False)
    return GenerateConfig(**{**base, **settings})


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# ----------------------------------------------------------------------------- config and plan


def test_sampling_mix_greedy_first_and_overrides(tmp_path: Path) -> None:
    cfg = GenerateConfig(prompts=tmp_path / "p.jsonl", output=tmp_path / "o.jsonl", num_candidates=3)
    assert [cfg.sampling_for(i).greedy for i in range(3)] == [True, False, False]
    cfg = GenerateConfig(prompts=tmp_path / "p.jsonl", output=tmp_path / "o.jsonl", num_candidates=3,
                         temperature=0.7, mix=[{"temperature": 1.2}, {"top_k": 5}])
    assert cfg.sampling_for(0) == SamplingParams(temperature=1.2, top_p=0.95, top_k=0)
    assert cfg.sampling_for(1) == SamplingParams(temperature=0.7, top_p=0.95, top_k=5)
    assert cfg.sampling_for(2) == SamplingParams(temperature=0.7, top_p=0.95, top_k=0)
    with pytest.raises(ValueError, match="mix has 2 entries"):
        GenerateConfig(prompts="p.jsonl", output="o.jsonl", num_candidates=1, mix=[{}, {}])
    with pytest.raises(ValueError, match="base_url"):
        GenerateConfig(prompts="p.jsonl", output="o.jsonl", backend="openai")


def test_system_prompt_from_file_and_merged_with_the_prompts_own(tmp_path: Path) -> None:
    (tmp_path / "rules.txt").write_text("Be concise.\n")
    cfg = GenerateConfig(prompts="p.jsonl", output="o.jsonl", system_prompt=f"@{tmp_path / 'rules.txt'}")
    assert cfg.system_prompt == "Be concise."
    assert teacher_messages("Hi", "Be concise.") == [{"role": "system", "content": "Be concise."},
                                                    {"role": "user", "content": "Hi"}]
    own_system = [{"role": "system", "content": "Use French."}, {"role": "user", "content": "Hi"}]
    merged = teacher_messages(own_system, "Rule.")
    assert merged[0] == {"role": "system", "content": "Rule.\n\nUse French."} and len(merged) == 2
    with pytest.raises(ValueError, match="does not exist"):
        GenerateConfig(prompts="p.jsonl", output="o.jsonl", system_prompt="@/nonexistent/rules.txt")


def test_candidate_ids_and_seeds_depend_only_on_seed_prompt_and_index(tmp_path: Path) -> None:
    records = read_prompts(write_jsonl(tmp_path / "p.jsonl", PROMPTS))
    cfg = GenerateConfig(prompts="p.jsonl", output="o.jsonl", num_candidates=2)
    a, b = build_job(records[0], cfg), build_job(records[0], cfg.model_copy(update={"batch_size": 1}))
    assert [c.id for c in a.candidates] == ["p1-c0", "p1-c1"]
    assert [c.seed for c in a.candidates] == [c.seed for c in b.candidates]
    other = build_job(records[0], cfg.model_copy(update={"seed": 1}))
    assert a.candidates[1].seed != other.candidates[1].seed


# ----------------------------------------------------------------------------- sampling and decoding


def test_nucleus_sampling_keeps_only_the_top_p_mass() -> None:
    n = 4000
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05])).expand(n, 4)
    uniform = torch.rand(n, generator=torch.Generator().manual_seed(0))
    full = lambda value: torch.full((n,), value)  # noqa: E731

    counts = Counter(sample_tokens(logits, full(1.0), full(0.8), full(0), uniform).tolist())
    assert set(counts) == {0, 1}  # 0.5 + 0.3 reaches 0.8: tokens 2 and 3 are cut
    assert counts[0] / n == pytest.approx(0.5 / 0.8, abs=0.03)
    assert set(sample_tokens(logits, full(1.0), full(1.0), full(1), uniform).tolist()) == {0}  # top-k 1
    counts = Counter(sample_tokens(logits, full(1.0), full(1.0), full(0), uniform).tolist())
    assert counts[3] / n == pytest.approx(0.05, abs=0.015)  # plain sampling keeps the tail
    assert set(sample_tokens(logits, full(0.0), full(0.5), full(0), uniform).tolist()) == {0}  # greedy


def test_decoding_matches_a_plain_forward_pass(tiny_model_dir: Path) -> None:
    """Shared prefill, left padding, cache fan-out, dropping finished rows and refilling the batch must not
    change the numbers:
    every recorded log-prob equals the one a plain unbatched forward pass gives for the same tokens."""
    from align.generate.backends.transformers import TransformersEngine

    engine = TransformersEngine(str(tiny_model_dir))
    prompts = [engine.encode([{"role": "user", "content": "hi " * n}]) for n in (1, 6, 3)]
    greedy, sampled = SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, top_p=0.9)
    rows = [RowRequest(p, s, 10 * p + i) for p in range(3) for i, s in enumerate((greedy, sampled, sampled))]
    # Treat the tiny model's favourite token as end-of-turn so greedy rows finish at once and get dropped.
    favourite = engine.generate(prompts[:1], rows[:1], max_new_tokens=1)[0]
    eos = [engine.tokenizer(favourite.text, add_special_tokens=False)["input_ids"][0]]
    one_batch = generate_rows(engine.model, prompts, rows, max_new_tokens=6, eos_token_ids=eos,
                              pad_token_id=engine.pad_token_id, logprobs=3)
    assert {o.finish_reason for o in one_batch} >= {"stop", "length"}
    # A batch of 5 rows makes prompts wait and join a running batch (cache padded to another width).
    refilled = generate_rows(engine.model, prompts, rows, max_new_tokens=6, eos_token_ids=eos,
                             pad_token_id=engine.pad_token_id, logprobs=3, batch_size=5)
    assert [o.token_ids for o in refilled] == [o.token_ids for o in one_batch]
    for row, out in [*zip(rows, one_batch), *zip(rows, refilled)]:
        ids = torch.tensor([prompts[row.prompt_index] + out.token_ids])
        with torch.inference_mode():
            logp = torch.log_softmax(engine.model(ids).logits[0].float(), dim=-1)
        start = len(prompts[row.prompt_index]) - 1
        expected = [logp[start + t, token].item() for t, token in enumerate(out.token_ids)]
        assert [e["token_id"] for e in out.logprobs] == out.token_ids
        assert [e["logprob"] for e in out.logprobs] == pytest.approx(expected, abs=1e-4)
        assert all(len(e["top_logprobs"]) == 3 for e in out.logprobs)
        if row.sampling.greedy:
            assert out.token_ids[0] == logp[start].argmax().item()


# ----------------------------------------------------------------------------- the stage


def test_generate_writes_one_candidate_set_per_prompt(tiny_model_dir: Path, prompts_file: Path,
                                                      tmp_path: Path) -> None:
    out = tmp_path / "candidates.jsonl"
    result = generate(config(tiny_model_dir, prompts_file, out, logprobs=2, seed=3, system_prompt="Be brief."))
    assert (result.generated, result.candidates, result.already_done) == (5, 15, 0)
    sets = list(read_records(out, "candidates"))
    # the prompts' order, not the batch's (longest prompt first: p2 would lead)
    assert [s.prompt_id for s in sets] == ["p1", "p2", "p3", "p4", "p5"]
    for s in sets:
        assert [c.id for c in s.responses] == [f"{s.prompt_id}-c{i}" for i in range(3)]
        assert s.teacher["model"] == str(tiny_model_dir) and s.teacher["backend"] == "transformers"
        assert s.teacher["system_prompt"] == "Be brief." and s.teacher["system_prompt_hash"]
        greedy, *sampled = s.responses
        assert greedy.sampling == {"do_sample": False, "temperature": 0.0, "max_new_tokens": 8}
        assert all(c.sampling["do_sample"] and c.sampling["temperature"] == 0.8 and "seed" in c.sampling
                   for c in sampled)
        for c in s.responses:
            assert c.finish_reason in ("stop", "length") and 1 <= c.num_tokens <= 8
            assert len(c.logprobs) == c.num_tokens
            assert all(isinstance(e["token_id"], int) and len(e["top_logprobs"]) == 2 for e in c.logprobs)
    assert sets[0].prompt_hash and sets[0].created_at
    assert result.tokens == sum(c.num_tokens for s in sets for c in s.responses)


def test_candidates_do_not_depend_on_batching(tiny_model_dir: Path, prompts_file: Path, tmp_path: Path) -> None:
    one = tmp_path / "one.jsonl"
    many = tmp_path / "many.jsonl"
    generate(config(tiny_model_dir, prompts_file, one, batch_size=1))
    generate(config(tiny_model_dir, prompts_file, many, batch_size=64))
    texts = lambda path: {s["prompt_id"]: [c["text"] for c in s["responses"]] for s in rows_of(path)}  # noqa: E731
    assert texts(one) == texts(many)
    reseeded = tmp_path / "reseeded.jsonl"
    generate(config(tiny_model_dir, prompts_file, reseeded, seed=1))
    assert texts(reseeded) != texts(one)


def test_duplicates_and_empty_candidates_are_flagged(tmp_path: Path) -> None:
    records = read_prompts(write_jsonl(tmp_path / "p.jsonl", PROMPTS[:1]))
    job = build_job(records[0], GenerateConfig(prompts="p.jsonl", output="o.jsonl", num_candidates=5))
    texts = ["Blue light scatters.", "  ", "Blue light scatters.\n", "Rayleigh.", ""]
    candidates = build_candidates(job, [Completion(t, "stop", 3) for t in texts], 8)
    assert [c.duplicate_of for c in candidates] == [None, None, "p1-c0", None, None]
    assert [c.empty for c in candidates] == [False, True, False, False, True]
    assert candidates[1].text == "  "  # kept as written


def test_resume_carries_on_and_never_duplicates(tiny_model_dir: Path, prompts_file: Path, tmp_path: Path) -> None:
    full = tmp_path / "full.jsonl"
    generate(config(tiny_model_dir, prompts_file, full))
    out = tmp_path / "resumed.jsonl"
    assert generate(config(tiny_model_dir, prompts_file, out, max_prompts=2)).generated == 2  # a trial first
    with out.open("a") as f:
        f.write('{"prompt_id": "p3", "responses": [')  # a writer killed mid-line
    result = generate(config(tiny_model_dir, prompts_file, out))
    assert (result.already_done, result.generated) == (2, 3)
    rows = rows_of(out)
    assert [r["prompt_id"] for r in rows] == ["p1", "p2", "p3", "p4", "p5"]  # finished: in the prompts' order
    by_id = lambda rs: {r["prompt_id"]: [c["text"] for c in r["responses"]] for r in rs}  # noqa: E731
    assert by_id(rows) == by_id(rows_of(full))
    assert generate(config(tiny_model_dir, prompts_file, out)).generated == 0


def test_resume_refuses_other_settings_and_overwrite_starts_again(tiny_model_dir: Path, prompts_file: Path,
                                                                  tmp_path: Path) -> None:
    out = tmp_path / "c.jsonl"
    generate(config(tiny_model_dir, prompts_file, out))
    before = out.read_bytes()
    with pytest.raises(AlignError, match="different settings"):
        generate(config(tiny_model_dir, prompts_file, out, temperature=0.5))
    assert out.read_bytes() == before
    result = generate(config(tiny_model_dir, prompts_file, out, temperature=0.5, overwrite=True))
    assert result.generated == 5 and len(rows_of(out)) == 5


@pytest.mark.parametrize("rows, where, words", [
    (['{"id": "a", "prompt": "ok"}', '{"id": "b", "prompt": '], ":2", "malformed JSON"),
    (['{"id": "a", "prompt": "ok"}', '{"id": "b", "prompt": "   "}'], ":2: field 'prompt'", "must not be empty"),
    (['{"id": "a", "prompt": "ok"}', '{"id": "b"}'], ":2: field 'prompt'", "missing"),
    (['{"id": "a", "prompt": "ok"}', '{"id": "a", "prompt": "again"}'], ":2: field 'id'", "duplicate prompt id"),
    ([], "", "no prompts"),
])
def test_bad_prompts_are_reported_with_file_line_field_and_output_is_untouched(
        tiny_model_dir: Path, tmp_path: Path, rows: list[str], where: str, words: str) -> None:
    prompts = write_jsonl(tmp_path / "bad.jsonl", rows)
    out = tmp_path / "c.jsonl"
    out.write_text('{"prompt_id": "old"}\n')
    with pytest.raises(DataError) as info:
        generate(config(tiny_model_dir, prompts, out, overwrite=True))
    assert f"{prompts}{where}" in str(info.value) and words in str(info.value)
    assert out.read_text() == '{"prompt_id": "old"}\n'


def test_missing_prompts_file_and_wrong_output_kind(tiny_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        generate(config(tiny_model_dir, tmp_path / "nope.jsonl", tmp_path / "c.jsonl"))
    with pytest.raises(ConfigError, match=".jsonl"):
        generate(config(tiny_model_dir, tmp_path / "nope.jsonl", tmp_path / "c.parquet"))


@pytest.mark.slow
def test_real_model_greedy_matches_transformers_and_candidates_differ(bundled_model: str, tmp_path: Path) -> None:
    from align.generate.backends.transformers import TransformersEngine

    engine = TransformersEngine(bundled_model)
    questions = ["What is the capital of France?", "Why do cats purr? Answer in one sentence.", "Define friction."]
    prompts = [engine.encode([{"role": "user", "content": q}]) for q in questions]
    ours = engine.generate(prompts, [RowRequest(i, SamplingParams(temperature=0.0), 0) for i in range(3)],
                           max_new_tokens=24)
    for ids, completion in zip(prompts, ours):
        with torch.inference_mode():
            reference = engine.model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=24,
                                              pad_token_id=engine.pad_token_id)
        assert completion.text == engine.tokenizer.decode(reference[0, len(ids):], skip_special_tokens=True)

    open_ended = ["Write a two-line poem about rain.", "Describe a quiet morning in one sentence."]
    prompts_file = write_jsonl(tmp_path / "p.jsonl", [{"id": f"q{i}", "prompt": q} for i, q in enumerate(open_ended)])
    out = tmp_path / "c.jsonl"
    generate(model=bundled_model, prompts=prompts_file, output=out, num_candidates=4, max_new_tokens=48,
             progress=False)
    for row in rows_of(out):
        texts = [c["text"] for c in row["responses"]]
        assert len(set(texts)) == 4 and all(t.strip() for t in texts)  # open questions: sampling differs
