"""An LLM judge that reads its verdict from answer probabilities, not from generated text.

Pairwise, the judge sees the prompt and two responses and is asked for one
letter, ``A`` or ``B``. A local model gives the verdict in one forward pass:
the next-token probabilities of the answer tokens (``A``/`` A`` and
``B``/`` B``), renormalised over the two answers. Judges prefer whichever
answer is shown first (or second), so every comparison is run in both orders
and combined symmetrically (Zheng et al. 2023, "Judging LLM-as-a-judge",
https://arxiv.org/abs/2306.05685, section 3.3)::

    p = ( P(A | x shown as A) + 1 - P(A | y shown as A) ) / 2

``p`` is the probability that x is better; swapping x and y gives exactly
``1 - p``. The confidence is ``|2p - 1|``; when the two orders name different
winners the verdict is flagged ``position_inconsistent``. The two orders (and
all questions' common rubric) are computed once up to where they differ
(align.label.shared_prefix).

Pointwise, the judge rates one response ``good``/``bad`` (score = P(good)) or
from 1 to 10 (score = the expected rating). "10" is two tokens ("1", "0"),
so the rating's input ends with an extra "1" and the same forward pass also
gives P("0" | "1"): P(10) = P("1") P("0"|"1"), P(1) = P("1") (1 - P("0"|"1")).

Length control (optional): judges tend to like longer answers. Every
pairwise judgement records the lengths and which side is longer, and a
``length_penalty`` lambda > 0 moves the verdict against the longer answer::

    logit(p') = logit(p) - lambda * log((words_a + 1) / (words_b + 1))

which is symmetric too (swapping the answers gives ``1 - p'``).

An HTTP judge (any OpenAI-compatible server) is asked for a one-token answer
(``max_tokens=1``, ``temperature=0``, ``logprobs`` with ``top_logprobs`` when
the server offers them). With log-probabilities the verdict is read as above;
without, the answer text must be exactly one of the answers. Anything else
is recorded as unparsed with its raw text, and never counted as a win.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from align.errors import AlignError, ConfigError
from align.label.shared_prefix import common_prefix_length, pack_groups, share_groups
from align.label.text_checks import words
from align.models import accepts_block_masks, cache_kwarg, prompt_token_ids
from align.models.openai_client import ATTEMPTS, EndpointError, OpenAIClient

Mode = Literal["pairwise", "pointwise"]
Scale = Literal["10", "good-bad"]

PAIRWISE_RUBRIC = ("You are a careful judge of answers to a user's request. Prefer the answer that is more "
                   "helpful, correct and honest, and that follows the request's instructions. Do not let the "
                   "order of the answers or their length influence you.")
POINTWISE_RUBRIC = ("You are a careful judge of answers to a user's request. Judge whether the answer is "
                    "helpful, correct and honest, and follows the request's instructions.")

PAIR_ANSWERS = ("A", "B")
GOOD_BAD_ANSWERS = ("good", "bad")
SCALE_ANSWERS = tuple(str(k) for k in range(1, 11))


class JudgeError(AlignError):
    pass


# ----------------------------------------------------------------------------- the math, in small pure functions


def debiased_probability(p_a_when_x_first: float, p_a_when_y_first: float) -> float:
    """P(x better than y) from both presentation orders; swapping x and y gives exactly 1 - this."""
    return (p_a_when_x_first + (1.0 - p_a_when_y_first)) / 2.0


def position_inconsistent(p_a_when_x_first: float, p_a_when_y_first: float) -> bool:
    """True when the two orders name different winners (the judge followed the slot, not the answer)."""
    x_wins_first_order = p_a_when_x_first - 0.5
    x_wins_second_order = (1.0 - p_a_when_y_first) - 0.5
    return x_wins_first_order * x_wins_second_order < 0


def confidence(p: float) -> float:
    """0 for a coin flip, 1 for certainty."""
    return abs(2.0 * p - 1.0)


def _logit(p: float) -> float:
    p = min(max(p, 1e-9), 1 - 1e-9)
    return math.log(p / (1 - p))


def length_adjusted(p: float, words_a: int, words_b: int, penalty: float) -> float:
    """Move P(a better) against the longer answer: logit(p) - penalty * log((words_a+1)/(words_b+1))."""
    if penalty == 0:
        return p
    z = _logit(p) - penalty * math.log((words_a + 1) / (words_b + 1))
    return 1.0 / (1.0 + math.exp(-z))


def pairwise_label(p: float, tie_margin: float) -> str:
    """'a', 'b' or 'tie' (when p is within ``tie_margin`` of 0.5)."""
    if p > 0.5 + tie_margin:
        return "a"
    if p < 0.5 - tie_margin:
        return "b"
    return "tie"


def scale_probabilities(first: dict[str, float], p_zero_after_one: float) -> dict[str, float]:
    """Ratings 1..10 from the first-digit probabilities and P("0" | "1") (see the module docstring)."""
    probs = {str(k): first.get(str(k), 0.0) for k in range(2, 10)}
    probs["1"] = first.get("1", 0.0) * (1.0 - p_zero_after_one)
    probs["10"] = first.get("1", 0.0) * p_zero_after_one
    return normalise(probs)


def normalise(probs: dict[str, float]) -> dict[str, float]:
    total = sum(probs.values())
    if total <= 0:
        return {k: 1.0 / len(probs) for k in probs}
    return {k: v / total for k, v in probs.items()}


def expected_rating(probs: dict[str, float]) -> float:
    return sum(int(k) * p for k, p in probs.items())


# ----------------------------------------------------------------------------- prompts


def render_prompt(prompt: Any) -> str:
    """A prompt as the judge reads it: the text, or a conversation as 'role: content' lines."""
    if isinstance(prompt, str):
        return prompt
    turns = [(m["role"], m["content"]) if isinstance(m, dict) else (m.role, m.content) for m in prompt]
    if len(turns) == 1:
        return turns[0][1]
    return "\n".join(f"{role}: {content}" for role, content in turns)


def pairwise_messages(prompt: str, a: str, b: str, rubric: str | None = None) -> list[dict[str, str]]:
    system = (rubric or PAIRWISE_RUBRIC) + "\nReply with a single letter: A or B."
    user = (f"[Request]\n{prompt}\n\n[Answer A]\n{a}\n\n[Answer B]\n{b}\n\n"
            "Which answer is better? Reply with A or B only.")
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def pointwise_messages(prompt: str, response: str, scale: Scale, rubric: str | None = None) -> list[dict[str, str]]:
    if scale == "10":
        ask, reply = "Rate the answer from 1 (worst) to 10 (best).", "Reply with a single number from 1 to 10."
    else:
        ask, reply = "Is the answer good or bad?", "Reply with one word: good or bad."
    system = (rubric or POINTWISE_RUBRIC) + "\n" + reply
    user = f"[Request]\n{prompt}\n\n[Answer]\n{response}\n\n{ask} {reply}"
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


# ----------------------------------------------------------------------------- backends


@dataclass
class Answer:
    """The judge's answer to one question: probabilities over the allowed answers, or unparsed raw text."""

    probs: dict[str, float] | None
    raw: str | None = None
    mass: float | None = None  # how much probability the judge put on allowed answers at all

    @property
    def parsed(self) -> bool:
        return self.probs is not None


class Backend(Protocol):
    model_name: str

    def choose(self, conversations: Sequence[list[dict[str, str]]], answers: Sequence[str]) -> list[Answer]: ...

    def rate(self, conversations: Sequence[list[dict[str, str]]]) -> list[Answer]: ...

    def truncate(self, text: str) -> tuple[str, bool]: ...


class LocalBackend:
    """A causal LM on this machine; every answer is one batched forward pass, no generation."""

    def __init__(self, model: str, *, batch_size: int = 8, max_response_tokens: int = 512, device: str | None = None,
                 share_prefixes: bool = True):
        from align.models import load_model, load_tokenizer

        self.model_name = model
        self.tokenizer = load_tokenizer(model)
        self.model = load_model(model, device=device).eval()
        self.device = next(self.model.parameters()).device
        self.batch_size = batch_size
        self.max_response_tokens = max_response_tokens
        self.share_prefixes = share_prefixes and accepts_block_masks(self.model)
        self.tokens_read = 0  # tokens run through the model, padding not counted (for benchmarks)

    def truncate(self, text: str) -> tuple[str, bool]:
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        if len(ids) <= self.max_response_tokens:
            return text, False
        return self.tokenizer.decode(ids[: self.max_response_tokens]) + " …", True

    def _variants(self, answer: str) -> list[int]:
        """Token ids that start the answer as the model might write it ('A', ' A', 'good', ' Good').

        Never a lower-case letter: ' a' is the article, not the answer.
        """
        ids: set[int] = set()
        for form in {answer, answer.capitalize()}:
            for text in (form, " " + form):
                encoded = self.tokenizer.encode(text, add_special_tokens=False)
                if len(encoded) == 1:
                    ids.add(encoded[0])
        if not ids:
            raise JudgeError(f"the judge's tokenizer has no single token for the answer {answer!r}")
        return sorted(ids)

    def _encode(self, conversation: list[dict[str, str]]) -> list[int]:
        return prompt_token_ids(self.tokenizer, conversation)

    def _answer_logprobs(self, sequences: list[list[int]], token_ids: list[int], keep: int) -> list[Any]:
        """log P(token | prefix) for ``token_ids`` at the last ``keep`` positions: one [keep, len(ids)] per sequence.

        Beginnings that questions share are computed once (align.label.shared_prefix) when the model's
        attention takes block masks; otherwise every question is its own left-padded row.
        """
        if self.share_prefixes and sequences:
            return self._shared_prefix_logprobs(sequences, token_ids, keep)
        return self._separate_logprobs(sequences, token_ids, keep)

    def _read(self, logits: Any, token_ids: Any) -> Any:
        return logits.float().log_softmax(-1).index_select(-1, token_ids).cpu()

    def _separate_logprobs(self, sequences: list[list[int]], token_ids: list[int], keep: int) -> list[Any]:
        import torch

        order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
        out: list[Any] = [None] * len(sequences)
        pad = self.tokenizer.pad_token_id
        index = torch.tensor(token_ids, device=self.device)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            width = max(len(sequences[i]) for i in chunk)
            # Left padding keeps every sequence's last token in the last column.
            input_ids = torch.tensor([[pad] * (width - len(sequences[i])) + sequences[i] for i in chunk],
                                     device=self.device)
            mask = torch.tensor([[0] * (width - len(sequences[i])) + [1] * len(sequences[i]) for i in chunk],
                                device=self.device)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            self.tokens_read += sum(len(sequences[i]) for i in chunk)
            with torch.inference_mode():
                logits = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                                    logits_to_keep=keep).logits[:, -keep:, :]
            logprobs = self._read(logits, index)
            for row, i in enumerate(chunk):
                out[i] = logprobs[row]
        return out

    def _shared_prefix_logprobs(self, sequences: list[list[int]], token_ids: list[int], keep: int) -> list[Any]:
        import copy

        import torch

        dtype = next(self.model.parameters()).dtype
        index = torch.tensor(token_ids, device=self.device)
        offset = max(0, min(common_prefix_length(sequences), min(len(s) for s in sequences) - keep))
        groups = share_groups(sequences, offset, self.batch_size)
        prefix_cache = None
        if offset:
            from transformers import DynamicCache

            prefix_cache = DynamicCache(config=self.model.config)
            self.tokens_read += offset
            with torch.inference_mode():
                self.model(input_ids=torch.tensor([sequences[0][:offset]], device=self.device), use_cache=True,
                           **{cache_kwarg(self.model): prefix_cache})
        out: list[Any] = [None] * len(sequences)
        # Longest rows first, and about batch_size questions per forward pass.
        groups.sort(key=lambda g: -sum(len(sequences[i]) for i in g))
        batch: list[list[int]] = []
        for g, group in enumerate(groups):
            batch.append(group)
            if g + 1 < len(groups) and sum(map(len, batch)) + len(groups[g + 1]) <= self.batch_size:
                continue
            packed = pack_groups([[sequences[i] for i in grp] for grp in batch], offset, keep,
                                 self.tokenizer.pad_token_id, dtype)
            cache = None
            if prefix_cache is not None:
                cache = copy.deepcopy(prefix_cache)
                cache.batch_repeat_interleave(len(batch))
            self.tokens_read += packed.tokens
            columns = sorted({c for _, cols in packed.reads for c in cols})
            at = {c: k for k, c in enumerate(columns)}
            with torch.inference_mode():
                logits = self.model(input_ids=packed.input_ids.to(self.device),
                                    attention_mask=packed.attention_mask.to(self.device),
                                    position_ids=packed.position_ids.to(self.device), use_cache=cache is not None,
                                    logits_to_keep=torch.tensor(columns, device=self.device),
                                    **{cache_kwarg(self.model): cache}).logits
            logprobs = self._read(logits, index)
            questions = [i for grp in batch for i in grp]
            for i, (row, cols) in zip(questions, packed.reads):
                out[i] = logprobs[row, [at[c] for c in cols]]
            batch = []
        return out

    def choose(self, conversations: Sequence[list[dict[str, str]]], answers: Sequence[str]) -> list[Answer]:
        variants = [self._variants(a) for a in answers]
        flat = sorted({t for v in variants for t in v})
        position = {t: i for i, t in enumerate(flat)}
        results = []
        for logprobs in self._answer_logprobs([self._encode(c) for c in conversations], flat, keep=1):
            probs = logprobs[0].exp()
            per_answer = {a: float(sum(probs[position[t]] for t in v)) for a, v in zip(answers, variants)}
            mass = sum(per_answer.values())
            results.append(Answer(normalise(per_answer), mass=mass))
        return results

    def rate(self, conversations: Sequence[list[dict[str, str]]]) -> list[Answer]:
        digits = [str(k) for k in range(1, 10)] + ["0"]
        ids = [self.tokenizer.encode(d, add_special_tokens=False) for d in digits]
        if any(len(i) != 1 for i in ids):
            raise JudgeError("the 1-10 scale needs a tokenizer with one token per digit; use --scale good-bad")
        digit_id = {d: i[0] for d, i in zip(digits, ids)}
        flat = sorted(set(digit_id.values()))
        position = {t: i for i, t in enumerate(flat)}
        # The extra "1" lets the same pass read P("0" | "1"), i.e. whether "1" is the start of "10".
        sequences = [self._encode(c) + [digit_id["1"]] for c in conversations]
        results = []
        for logprobs in self._answer_logprobs(sequences, flat, keep=2):
            first = {d: float(logprobs[0, position[digit_id[d]]].exp()) for d in digits[:9]}
            p_zero = float(logprobs[1, position[digit_id["0"]]].exp())
            results.append(Answer(scale_probabilities(first, p_zero), mass=sum(first.values())))
        return results


def parse_http_answer(body: dict[str, Any], answers: Sequence[str], *, use_logprobs: bool = True,
                      ignore_case: bool = False) -> Answer:
    """Read an OpenAI-style chat completion strictly: log-probabilities of the answers, or an exact answer text."""
    try:
        choice = body["choices"][0]
        raw = choice["message"].get("content") or ""
    except (KeyError, IndexError, TypeError, AttributeError):
        return Answer(None, raw=str(body)[:500])

    def key(text: str) -> str:
        return text.strip().lower() if ignore_case else text.strip()

    by_key = {key(a): a for a in answers}
    if use_logprobs:
        top = ((choice.get("logprobs") or {}).get("content") or [{}])[0].get("top_logprobs") or []
        found: dict[str, float] = {a: 0.0 for a in answers}
        for entry in top:
            answer = by_key.get(key(str(entry.get("token", ""))))
            if answer is not None and isinstance(entry.get("logprob"), (int, float)):
                found[answer] += math.exp(entry["logprob"])
        mass = sum(found.values())
        if mass > 0:
            return Answer(normalise(found), raw=raw, mass=mass)
    answer = by_key.get(key(raw))
    if answer is None:
        return Answer(None, raw=raw)
    return Answer({a: 1.0 if a == answer else 0.0 for a in answers}, raw=raw)


class HttpBackend:
    """An OpenAI-compatible chat completions endpoint, asked for a one-token answer.

    URL, API key and retries follow align.models.openai_client, as the HTTP teacher does.
    """

    def __init__(self, base_url: str, model: str, *, api_key_env: str | None = None, concurrency: int = 4,
                 timeout: float = 120.0, logprobs: bool = True, attempts: int = ATTEMPTS, backoff_s: float = 1.0):
        self.model_name = model
        self.client = OpenAIClient(base_url, api_key_env=api_key_env, timeout=timeout, attempts=attempts,
                                   backoff_s=backoff_s)
        self.url = self.client.url
        self.concurrency = concurrency
        self.logprobs = logprobs

    def truncate(self, text: str) -> tuple[str, bool]:
        return text, False

    def _post(self, conversation: list[dict[str, str]], max_tokens: int, logprobs: bool) -> dict[str, Any]:
        payload: dict[str, Any] = {"model": self.model_name, "messages": conversation, "max_tokens": max_tokens,
                                   "temperature": 0.0}
        if logprobs:
            payload.update(logprobs=True, top_logprobs=20)
        try:
            return self.client.chat(payload, what="a judge question")
        except EndpointError as exc:
            if exc.status == 400 and logprobs:
                # Some servers refuse logprobs; ask again for the plain answer (and from now on).
                self.logprobs = False
                return self._post(conversation, max_tokens, False)
            raise

    def _ask(self, conversations: Sequence[list[dict[str, str]]], answers: Sequence[str], max_tokens: int,
             logprobs: bool, ignore_case: bool) -> list[Answer]:
        def one(conversation: list[dict[str, str]]) -> Answer:
            body = self._post(conversation, max_tokens, logprobs and self.logprobs)
            return parse_http_answer(body, answers, use_logprobs=logprobs and self.logprobs, ignore_case=ignore_case)

        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(one, conversations))

    def choose(self, conversations: Sequence[list[dict[str, str]]], answers: Sequence[str]) -> list[Answer]:
        words_answers = any(len(a) > 1 for a in answers)
        return self._ask(conversations, answers, 2 if words_answers else 1, True, ignore_case=words_answers)

    def rate(self, conversations: Sequence[list[dict[str, str]]]) -> list[Answer]:
        # "10" is two tokens for most tokenizers and "1" is its prefix: read the text, not the first token.
        return self._ask(conversations, SCALE_ANSWERS, 3, False, ignore_case=False)


# ----------------------------------------------------------------------------- verdicts


@dataclass
class JudgeSettings:
    mode: Mode = "pairwise"
    scale: Scale = "10"
    rubric: str | None = None
    tie_margin: float = 0.05
    length_penalty: float = 0.0


@dataclass
class PairVerdict:
    """x (shown first in the input) versus y, judged in both orders."""

    score: float | None  # P(x better), after length control; None when unparsed
    label: str | None
    confidence: float | None
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class PointVerdict:
    score: float | None
    label: str | None
    confidence: float | None
    details: dict[str, Any] = field(default_factory=dict)


class Judge:
    """Turns (prompt, responses) into verdicts with a backend; knows nothing about files."""

    def __init__(self, backend: Backend, settings: JudgeSettings):
        self.backend = backend
        self.settings = settings

    def compare(self, items: Sequence[tuple[str, str, str]]) -> list[PairVerdict]:
        """(prompt, x, y) -> verdicts. Each item becomes two questions (x first, y first) in one batch."""
        conversations, truncated = [], []
        for prompt, x, y in items:
            (x_text, x_cut), (y_text, y_cut) = self.backend.truncate(x), self.backend.truncate(y)
            truncated.append(x_cut or y_cut)
            conversations.append(pairwise_messages(prompt, x_text, y_text, self.settings.rubric))
            conversations.append(pairwise_messages(prompt, y_text, x_text, self.settings.rubric))
        answers = self.backend.choose(conversations, PAIR_ANSWERS)
        return [self._pair_verdict(x, y, answers[2 * i], answers[2 * i + 1], truncated[i])
                for i, (_, x, y) in enumerate(items)]

    def _pair_verdict(self, x: str, y: str, x_first: Answer, y_first: Answer, truncated: bool) -> PairVerdict:
        orders = [_order_record("ab", x_first), _order_record("ba", y_first)]
        words_x, words_y = len(words(x)), len(words(y))
        length = {"words_a": words_x, "words_b": words_y,
                  "longer": "a" if words_x > words_y else "b" if words_y > words_x else None}
        details: dict[str, Any] = {"orders": orders, "length": length}
        if truncated:
            details["truncated"] = True
        if not (x_first.parsed and y_first.parsed):
            details["unparsed"] = True
            return PairVerdict(None, None, None, details)
        p_ab, p_ba = x_first.probs["A"], y_first.probs["A"]  # type: ignore[index]
        p = debiased_probability(p_ab, p_ba)
        details.update(p_a_debiased=round(p, 6), position_inconsistent=position_inconsistent(p_ab, p_ba),
                       position_bias=round((p_ab + p_ba) / 2 - 0.5, 6))
        if self.settings.length_penalty:
            p = length_adjusted(p, words_x, words_y, self.settings.length_penalty)
            length.update(penalty=self.settings.length_penalty, p_a_length_adjusted=round(p, 6))
        return PairVerdict(round(p, 6), pairwise_label(p, self.settings.tie_margin), round(confidence(p), 6), details)

    def rate(self, items: Sequence[tuple[str, str]]) -> list[PointVerdict]:
        conversations, truncated = [], []
        for prompt, response in items:
            text, cut = self.backend.truncate(response)
            truncated.append(cut)
            conversations.append(pointwise_messages(prompt, text, self.settings.scale, self.settings.rubric))
        if self.settings.scale == "10":
            answers = self.backend.rate(conversations)
        else:
            answers = self.backend.choose(conversations, GOOD_BAD_ANSWERS)
        return [self._point_verdict(a, cut) for a, cut in zip(answers, truncated)]

    def _point_verdict(self, answer: Answer, truncated: bool) -> PointVerdict:
        details: dict[str, Any] = {"scale": self.settings.scale}
        if truncated:
            details["truncated"] = True
        if answer.raw is not None:
            details["raw"] = answer.raw
        if answer.mass is not None:
            details["answer_mass"] = round(answer.mass, 6)
        if not answer.parsed:
            details["unparsed"] = True
            return PointVerdict(None, None, None, details)
        probs = answer.probs or {}
        details["probs"] = {k: round(v, 6) for k, v in probs.items()}
        if self.settings.scale == "10":
            score = expected_rating(probs)
            # The most likely rating's probability: how sure the judge is of *a* rating.
            return PointVerdict(round(score, 6), "good" if score > 5.5 else "bad", round(max(probs.values()), 6),
                                details)
        p_good = probs["good"]
        return PointVerdict(round(p_good, 6), "good" if p_good >= 0.5 else "bad", round(confidence(p_good), 6),
                            details)


def _order_record(order: str, answer: Answer) -> dict[str, Any]:
    record: dict[str, Any] = {"order": order}
    if answer.parsed:
        record["p_a"] = round(answer.probs["A"], 6)  # type: ignore[index]
    else:
        record["unparsed"] = True
    if answer.mass is not None:
        record["answer_mass"] = round(answer.mass, 6)
    if answer.raw is not None:
        record["raw"] = answer.raw
    return record


def make_backend(model: str, *, base_url: str | None = None, api_key_env: str | None = None, batch_size: int = 8,
                 max_response_tokens: int = 512, concurrency: int = 4) -> Backend:
    if base_url:
        return HttpBackend(base_url, model, api_key_env=api_key_env, concurrency=concurrency)
    if api_key_env:
        raise ConfigError("--api-key-env needs --base-url (a local model needs no key)")
    return LocalBackend(model, batch_size=batch_size, max_response_tokens=max_response_tokens)
