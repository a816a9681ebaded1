"""The Argilla loop against a real local Argilla (server, worker, noida-db), driven by the real SDK and,
in one test, by a real browser (Debian's chromium through Playwright).

The stack starts once per session on free loopback ports under a temporary
home and is stopped by PID at the end. Third-party data: the first pairs of
LLaMA-Factory's ``dpo_en_demo.json``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import pytest

from align.argilla import local
from align.argilla.aggregate import fleiss_kappa
from align.argilla.push import plan_push, push
from align.argilla.remote import external_ids, find_dataset
from align.argilla.settings import ArgillaSettings, ArgillaUnavailable, connect, resolve_settings
from align.data.io import write_records
from align.data.records import Candidate, CandidateSet, JudgedResponse, Judgement, JudgeInfo, content_hash
from align.data.validate import load_records
from tests.clihelp import run_align

pytestmark = pytest.mark.argilla

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]


# ----------------------------------------------------------------------------- the stack


@pytest.fixture(scope="session")
def argilla_home(tmp_path_factory: pytest.TempPathFactory) -> Any:
    home = tmp_path_factory.mktemp("argilla-home")
    status = local.up(home)
    assert status.running, "\n".join(status.lines())
    refs = dict(status.state.processes)  # type: ignore[union-attr]
    yield home
    local.down(home)
    assert not any(local.is_alive(ref) for ref in refs.values()), "the stack outlived the session"


@pytest.fixture(autouse=True)
def _no_outside_argilla(monkeypatch: pytest.MonkeyPatch) -> None:
    # The tests talk to the session's stack only, whatever the developer's environment says.
    monkeypatch.delenv("ARGILLA_API_URL", raising=False)
    monkeypatch.delenv("ARGILLA_API_KEY", raising=False)


@pytest.fixture
def settings(argilla_home: Path) -> ArgillaSettings:
    return resolve_settings(home=argilla_home)


@pytest.fixture
def client(settings: ArgillaSettings) -> Any:
    return connect(settings)


# ----------------------------------------------------------------------------- data


def pair_sets(shared_data: Path, count: int = 20, start: int = 0) -> list[CandidateSet]:
    """Candidate pairs from third-party data; odd prompts show the rejected answer first."""
    rows = json.loads((shared_data / "dpo_en_demo.json").read_text())[start:start + count]
    sets = []
    for i, row in enumerate(rows, start=start):
        prompt = row["conversations"][-1]["value"]
        first, second = row["chosen"]["value"], row["rejected"]["value"]
        if i % 2:
            first, second = second, first
        sets.append(CandidateSet(prompt_id=f"p{i:02d}", prompt=prompt, prompt_hash=content_hash(prompt),
                                 responses=[Candidate(id="c0", text=first), Candidate(id="c1", text=second)],
                                 teacher={"name": "dpo_en_demo"}))
    return sets


def judge_sets(sets: list[CandidateSet]) -> list[Judgement]:
    """What an LLM judge would write: the chosen answer wins; every third verdict unsure."""
    out = []
    for i, s in enumerate(sets):
        a, b = s.responses
        label = "a" if int(s.prompt_id[1:]) % 2 == 0 else "b"
        out.append(Judgement(id=f"{s.prompt_id}:c0-vs-c1", prompt_id=s.prompt_id, prompt=s.prompt, kind="pairwise",
                             responses=[JudgedResponse(id=a.id, text=a.text), JudgedResponse(id=b.id, text=b.text)],
                             judge=JudgeInfo(type="llm", name="judge:test-judge"), label=label,
                             score=0.9 if label == "a" else 0.1, confidence=0.55 if i % 3 == 0 else 0.95))
    return out


def write_pairs(tmp_path: Path, shared_data: Path, count: int = 20, start: int = 0) -> tuple[Path, Path]:
    sets = pair_sets(shared_data, count, start)
    candidates, judgements = tmp_path / f"cand-{start}-{count}.jsonl", tmp_path / f"judg-{start}-{count}.jsonl"
    write_records(candidates, sets)
    write_records(judgements, judge_sets(sets))
    return candidates, judgements


def record_ids(candidates: Path, task: str | None = None) -> list[str]:
    items, _ = plan_push(load_records(candidates, "candidates"), None, task=task)
    return [i.record_id for i in items]


def annotators(client: Any, *names: str) -> dict[str, Any]:
    import argilla as rg

    workspace = client.workspaces("argilla")
    users = {}
    for name in names:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "user not found" is the answer we ask for
            user = client.users(name)
        if user is None:
            user = rg.User(username=name, password="annotator-pw", role="annotator", client=client).create()
            user.add_to_workspace(workspace)
        users[name] = user
    return users


def answer(client: Any, dataset: str, answers: dict[str, list[tuple[str, dict[str, Any], str]]]) -> None:
    """``answers[record_id] = [(username, {question: value}, status), ...]``, logged through the SDK."""
    import argilla as rg

    ds = find_dataset(client, dataset)
    users = annotators(client, *{name for given in answers.values() for name, _, _ in given})
    updated = []
    for record in ds.records(with_responses=True, with_suggestions=True):
        for name, values, status in answers.get(record.id, []):
            for question, value in values.items():
                record.responses.add(rg.Response(question_name=question, value=value, user_id=users[name].id,
                                                 status=status))
        if record.id in answers:
            updated.append(record)
    assert len(updated) == len(answers)
    ds.records.log(updated)


def server_records(client: Any, dataset: str) -> list[str]:
    return external_ids(client, find_dataset(client, dataset))


# ----------------------------------------------------------------------------- tests


def test_up_again_is_a_no_op_and_status_reports(argilla_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = local.read_state(argilla_home)
    code, out, err = run_align(capsys, "argilla", "up", "--home", argilla_home)
    assert code == 0, err
    assert before is not None and before.url in out and "argilla / 1234" in out
    assert local.read_state(argilla_home).processes == before.processes  # type: ignore[union-attr]
    code, out, _ = run_align(capsys, "argilla", "status", "--home", argilla_home)
    assert code == 0 and "running" in out and before.url in out


def test_push_pull_with_several_annotators(tmp_path: Path, shared_data: Path, client: Any, argilla_home: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    candidates, judgements = write_pairs(tmp_path, shared_data)
    args = ["argilla", "push", candidates, "--dataset", "multi", "--judgements", judgements, "--min-submitted", "2",
            "--home", argilla_home]
    code, out, err = run_align(capsys, *args)
    assert code == 0, err
    assert "20 new" in out and "20 with a suggestion" in out
    ds = find_dataset(client, "multi")
    assert ds.settings.distribution.min_submitted == 2
    suggestion = next(iter(ds.records(with_suggestions=True))).suggestions["preference"]
    assert suggestion.agent == "judge:test-judge" and suggestion.score in (0.55, 0.95)

    ids = record_ids(candidates)
    answer(client, "multi", {
        ids[0]: [("x", {"preference": "a", "rationale": "A answers the question"}, "submitted"),
                 ("y", {"preference": "a"}, "submitted"), ("z", {"preference": "a"}, "submitted")],
        ids[1]: [("x", {"preference": "b"}, "submitted"), ("y", {"preference": "b"}, "submitted"),
                 ("z", {"preference": "a"}, "submitted")],
        ids[2]: [("x", {"preference": "a"}, "submitted"), ("y", {"preference": "b"}, "submitted")],
        ids[3]: [("x", {"preference": "tie"}, "submitted"), ("y", {"preference": "tie"}, "submitted")],
        ids[4]: [("x", {"preference": "both_bad"}, "submitted")],
        ids[5]: [("x", {"preference": "a"}, "discarded"), ("y", {"preference": "b"}, "draft")],
    })
    out_file, report = tmp_path / "human.jsonl", tmp_path / "report.json"
    code, out, err = run_align(capsys, "argilla", "pull", "--dataset", "multi", "-o", out_file, "--report", report,
                               "--home", argilla_home)
    assert code == 0, err
    pulled = {j.prompt_id: j for j in load_records(out_file, "judgements")}
    assert sorted(pulled) == ["p00", "p01", "p02", "p03", "p04"]  # p05: discarded and draft only
    assert {p: j.label for p, j in pulled.items()} == {"p00": "a", "p01": "b", "p02": None, "p03": "tie",
                                                      "p04": "both_bad"}
    assert pulled["p02"].details["tied"] == ["a", "b"]
    assert pulled["p00"].annotator == "x,y,z" and pulled["p00"].judge.type == "human"
    assert pulled["p00"].rationale == "x: A answers the question"
    assert pulled["p01"].confidence == pytest.approx(2 / 3) and pulled["p01"].score == pytest.approx(1 / 3)
    assert [r.id for r in pulled["p04"].responses] == ["c0", "c1"]
    assert pulled["p00"].id == "p00:c0-vs-c1"  # the same id the LLM judge gives, so the two line up

    summary = json.loads(report.read_text())
    agreement = summary["agreement"]
    # By hand: P_bar = (1 + 1/3 + 0 + 1) / 4, P_e = .5^2 + .3^2 + .2^2 -> kappa 0.328.
    assert agreement["fleiss_kappa"] == pytest.approx(0.328, abs=1e-3)
    assert agreement["fleiss_kappa"] == pytest.approx(
        fleiss_kappa([["a"] * 3, ["b", "b", "a"], ["a", "b"], ["tie", "tie"]]), abs=1e-4)
    assert agreement["ties"] == 1 and summary["responses"] == {"discarded": 1, "draft": 1, "submitted": 11}
    # Suggestions: p00 a (=), p01 b (=), p03 a (people: tie), p04 b (people: both bad); p02 has no majority.
    assert agreement["suggestion_items"] == 4 and agreement["suggestion_agreement"] == 0.5
    assert "Fleiss' kappa 0.328" in out

    first = out_file.read_bytes()
    run_align(capsys, "argilla", "pull", "--dataset", "multi", "-o", out_file, "--home", argilla_home)
    assert out_file.read_bytes() == first  # pulling twice gives the same file

    code, out, _ = run_align(capsys, *args)  # the same push again: updates, keeps people's answers
    assert code == 0 and "0 new, 20 already there" in out
    assert len(server_records(client, "multi")) == 20
    run_align(capsys, "argilla", "pull", "--dataset", "multi", "-o", out_file, "--home", argilla_home)
    assert out_file.read_bytes() == first

    # Overlap and guidelines can change on a dataset that already has answers.
    code, out, _ = run_align(capsys, *args[:-4], "--min-submitted", "3", "--guidelines", "Pick the kinder answer.",
                             "--home", argilla_home)
    assert code == 0 and "min_submitted 2 -> 3" in out and "updated the guidelines" in out
    ds = find_dataset(client, "multi")
    assert ds.settings.distribution.min_submitted == 3 and ds.settings.guidelines == "Pick the kinder answer."
    code, out, _ = run_align(capsys, *args[:-4], "--home", argilla_home)  # not given: kept as they are
    assert code == 0 and "min_submitted" not in out and "guidelines" not in out
    ds = find_dataset(client, "multi")
    assert ds.settings.distribution.min_submitted == 3 and ds.settings.guidelines == "Pick the kinder answer."


def test_partial_push_then_full_push_has_no_duplicates(tmp_path: Path, shared_data: Path, client: Any,
                                                       settings: ArgillaSettings) -> None:
    part, _ = write_pairs(tmp_path, shared_data, count=7)
    whole, judgements = write_pairs(tmp_path, shared_data, count=20)
    assert push(part, "resume", settings).new == 7
    result = push(whole, "resume", settings, judgements_path=judgements)
    assert (result.new, result.records, result.total_on_server) == (13, 20, 20)
    assert sorted(server_records(client, "resume")) == sorted(record_ids(whole))


class CuttingProxy:
    """A TCP relay to the server that breaks every bulk record upload after the first ``allow`` ones.

    A real network failure half-way through a push: the connection is closed
    under the SDK while it sends a batch. ``on_cut`` runs first, once (e.g. to kill the server itself).
    """

    def __init__(self, target_port: int, allow: int, on_cut: Any = None):
        self.target_port, self.allow, self.uploads, self.on_cut = target_port, allow, 0, on_cut
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                downstream, _ = self.server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:  # the server is gone: the client sees its connection refused
                downstream.close()
                continue
            threading.Thread(target=self._pipe, args=(downstream, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, downstream, False), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, watch: bool) -> None:
        try:
            while data := source.recv(65536):
                if watch and b"/records/bulk" in data:
                    with self.lock:
                        self.uploads += 1
                        cut = self.uploads > self.allow
                        if cut and self.on_cut:
                            self.on_cut()
                            self.on_cut = None
                    if cut:
                        break
                sink.sendall(data)
        except OSError:
            pass
        for s in (source, sink):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self) -> None:
        self.server.close()


@pytest.mark.reliability
def test_push_cut_by_the_network_is_finished_by_a_rerun(tmp_path: Path, shared_data: Path, client: Any,
                                                        settings: ArgillaSettings) -> None:
    candidates, judgements = write_pairs(tmp_path, shared_data)
    port = int(settings.api_url.rsplit(":", 1)[1])
    proxy = CuttingProxy(port, allow=2)
    flaky = settings.model_copy(update={"api_url": f"http://127.0.0.1:{proxy.port}"})
    try:
        with pytest.raises(ArgillaUnavailable) as caught:
            push(candidates, "cut", flaky, judgements_path=judgements, batch_size=5)
    finally:
        proxy.close()
    assert "failed part-way" in str(caught.value) and "run the same command again" in str(caught.value)
    assert len(server_records(client, "cut")) == 10  # two batches of five made it
    result = push(candidates, "cut", settings, judgements_path=judgements, batch_size=5)
    assert (result.new, result.total_on_server) == (10, 20)
    assert sorted(server_records(client, "cut")) == sorted(record_ids(candidates))


@pytest.mark.reliability
def test_a_server_killed_mid_push_comes_back_with_up_and_a_rerun_finishes_without_duplicates(
        tmp_path: Path, shared_data: Path, argilla_home: Path, settings: ArgillaSettings) -> None:
    """The Argilla server process itself SIGKILLed while a push sends its third batch: the push stops with a
    clear error, `align argilla up` brings the stack back with what it had stored, and the same push again
    finishes it without duplicates."""
    candidates, judgements = write_pairs(tmp_path, shared_data)
    server = local.read_state(argilla_home).processes["server"]  # type: ignore[union-attr]
    proxy = CuttingProxy(int(settings.api_url.rsplit(":", 1)[1]), allow=2,
                         on_cut=lambda: os.kill(server.pid, signal.SIGKILL))
    doomed = settings.model_copy(update={"api_url": f"http://127.0.0.1:{proxy.port}"})
    try:
        with pytest.raises(ArgillaUnavailable) as caught:
            push(candidates, "server-killed", doomed, judgements_path=judgements, batch_size=5)
        deadline = time.monotonic() + 10  # a killed process takes a moment to be gone
        while local.is_alive(server) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not local.is_alive(server)
    finally:
        proxy.close()
        assert local.up(argilla_home).running  # the later tests need the stack, whatever happened here
    assert "failed part-way" in str(caught.value) and "run the same command again" in str(caught.value)
    back = resolve_settings(home=argilla_home)
    assert len(server_records(connect(back), "server-killed")) == 10  # the two batches it stored are kept
    result = push(candidates, "server-killed", back, judgements_path=judgements, batch_size=5)
    assert (result.new, result.total_on_server) == (10, 20)
    assert sorted(server_records(connect(back), "server-killed")) == sorted(record_ids(candidates))


def test_rules_judgements_and_only_uncertain(tmp_path: Path, shared_data: Path, argilla_home: Path, client: Any,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    candidates, judgements = write_pairs(tmp_path, shared_data)
    rules = tmp_path / "rules.jsonl"
    code, _, err = run_align(capsys, "label", "rules", candidates, "--rules", REPO / "configs/rules/default.yaml",
                             "-o", rules, "--no-progress")
    assert code == 0, err
    code, out, err = run_align(capsys, "argilla", "push", candidates, "--dataset", "from-rules", "--judgements",
                               rules, "--task", "single", "--home", argilla_home)
    assert code == 0 and "40 with a suggestion" in out, err
    by_response = {(j.prompt_id, j.responses[0].id): j.label for j in load_records(rules, "judgements")}
    meta = {r.id: json.loads(r.metadata["_align"]) for r in find_dataset(client, "from-rules").records()}
    for record in find_dataset(client, "from-rules").records(with_suggestions=True):
        suggestion = record.suggestions["quality"]
        provenance = meta[record.id]
        assert suggestion.agent == "default"  # the rules file's name
        assert suggestion.value == by_response[(provenance["prompt_id"], provenance["response_ids"][0])]

    code, out, err = run_align(capsys, "argilla", "push", candidates, "--dataset", "unsure", "--judgements",
                               judgements, "--only-uncertain", "--home", argilla_home)
    assert code == 0, err
    unsure = [j.prompt_id for j in judge_sets(pair_sets(shared_data)) if j.confidence < 0.8]
    assert len(server_records(client, "unsure")) == len(unsure) == 7
    assert f"left out {20 - len(unsure)} confident" in out


def test_dataset_with_other_questions_is_refused_unless_forced(tmp_path: Path, shared_data: Path,
                                                               argilla_home: Path, client: Any,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    candidates, _ = write_pairs(tmp_path, shared_data, count=3)
    assert run_align(capsys, "argilla", "push", candidates, "--dataset", "clash", "--home", argilla_home)[0] == 0
    args = ["argilla", "push", candidates, "--dataset", "clash", "--task", "single", "--home", argilla_home]
    code, _, err = run_align(capsys, *args)
    assert code == 2
    assert "exists with other questions" in err and "question 'quality': missing" in err and "--force" in err
    assert len(server_records(client, "clash")) == 3  # untouched
    code, out, err = run_align(capsys, *args, "--force")
    assert code == 0, err
    assert "deleted 'clash' (--force)" in out and len(server_records(client, "clash")) == 6  # one per response


def test_settings_differences_are_described(client: Any) -> None:
    from align.argilla.schema import dataset_settings, differences

    pairwise = dataset_settings("pairwise", responses=2)
    assert differences(pairwise, dataset_settings("pairwise", responses=2, min_submitted=3)) == []
    assert differences(dataset_settings("ranking", responses=3), dataset_settings("ranking", responses=4))


def test_wrong_key_is_refused_with_the_url(settings: ArgillaSettings, capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ARGILLA_API_URL", settings.api_url)
    monkeypatch.setenv("ARGILLA_API_KEY", "not-the-key")
    code, _, err = run_align(capsys, "argilla", "pull", "--dataset", "multi", "-o", tmp_path / "x.jsonl")
    assert code == 2
    assert settings.api_url in err and "refused the API key" in err and "not-the-key" not in err


def test_ranking_keeps_ranks_and_ties(tmp_path: Path, client: Any, settings: ArgillaSettings) -> None:
    sets = [CandidateSet(prompt_id=f"r{i}", prompt=f"Name a colour ({i})", prompt_hash=content_hash(i),
                         responses=[Candidate(id=f"c{k}", text=t) for k, t in enumerate(["red", "blue", "plaid"])])
            for i in range(2)]
    candidates = tmp_path / "three.jsonl"
    write_records(candidates, sets)
    assert push(candidates, "ranks", settings).task == "ranking"
    ids = record_ids(candidates)
    ranks = [{"value": "response_1", "rank": 1}, {"value": "response_2", "rank": 1},
             {"value": "response_3", "rank": 3}]
    answer(client, "ranks", {ids[0]: [("x", {"ranking": ranks}, "submitted"),
                                      ("y", {"ranking": [{"value": "response_2", "rank": 1},
                                                         {"value": "response_1", "rank": 2},
                                                         {"value": "response_3", "rank": 3}]}, "submitted")]})
    from align.argilla.pull import pull

    result = pull("ranks", tmp_path / "ranked.jsonl", settings)
    pulled = {j.id: j for j in load_records(tmp_path / "ranked.jsonl", "judgements")}
    assert sorted(pulled) == ["r0:c0", "r0:c1", "r0:c2"]
    assert pulled["r0:c0"].details["ranks"] == {"x": 1, "y": 2}  # x's tie survived the round trip
    assert pulled["r0:c1"].details["ranks"] == {"x": 1, "y": 1}
    assert (pulled["r0:c1"].score, pulled["r0:c0"].score, pulled["r0:c2"].score) == (1.0, 0.75, 0.0)
    assert result.agreement is not None and result.agreement.unit == "response pairs"
    assert result.agreement.multi_rated == 3 and result.agreement.observed_agreement == pytest.approx(2 / 3, abs=1e-3)


def test_single_response_good_bad(tmp_path: Path, shared_data: Path, client: Any, settings: ArgillaSettings) -> None:
    from align.argilla.pull import pull

    sets = pair_sets(shared_data, count=2)
    candidates = tmp_path / "kto.jsonl"
    write_records(candidates, sets)
    assert push(candidates, "kto", settings, task="single").records == 4
    ids = record_ids(candidates, task="single")
    answer(client, "kto", {ids[0]: [("x", {"quality": "good"}, "submitted")],
                           ids[1]: [("x", {"quality": "bad"}, "submitted"), ("y", {"quality": "bad"}, "submitted")]})
    pull("kto", tmp_path / "kto-human.jsonl", settings)
    pulled = {j.id: (j.kind, j.label, j.score) for j in load_records(tmp_path / "kto-human.jsonl", "judgements")}
    assert pulled == {"p00:c0": ("pointwise", "good", 1.0), "p00:c1": ("pointwise", "bad", 0.0)}


def test_label_with_people_waits_then_pulls(tmp_path: Path, shared_data: Path, client: Any,
                                            settings: ArgillaSettings) -> None:
    from align.argilla.loop import label_with_people

    candidates, judgements = write_pairs(tmp_path, shared_data, count=4)
    output = tmp_path / "loop.jsonl"
    first = label_with_people(candidates, "loop", output, settings, target=2, judgements_path=judgements)
    assert not first.done and first.submitted == 0 and not output.exists()
    ids = record_ids(candidates)
    answer(client, "loop", {i: [("x", {"preference": "a"}, "submitted")] for i in ids[:2]})
    second = label_with_people(candidates, "loop", output, settings, target=2, judgements_path=judgements)
    assert second.done and second.pushed.new == 0
    assert [j.label for j in load_records(output, "judgements")] == ["a", "a"]


def test_browser_answers_are_pulled(tmp_path: Path, shared_data: Path, argilla_home: Path, client: Any,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    """Sign in to the UI, answer two records by clicking, submit; `align argilla pull` sees exactly that."""
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: `make test` installs Debian's chromium (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    candidates, judgements = write_pairs(tmp_path, shared_data)
    push_args = ["argilla", "push", candidates, "--dataset", "ui-pairs", "--judgements", judgements,
                 "--home", argilla_home]
    assert run_align(capsys, *push_args)[0] == 0
    url = local.read_state(argilla_home).url  # type: ignore[union-attr]
    ARTIFACTS.mkdir(exist_ok=True)
    seen: list[tuple[str, str]] = []  # (prompt shown, label clicked)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{url}/sign-in")
            page.fill("input[name=Username]", local.DEFAULT_USERNAME)
            page.fill("input[name=Password]", local.DEFAULT_PASSWORD)
            page.click("button[type=submit]")
            page.get_by_text("ui-pairs", exact=True).first.click()
            for label, rationale in (("b", "B is more useful (browser test)"), ("tie", "")):
                option = page.locator(f"label[for=preference_{label}]")
                option.wait_for(timeout=30_000)
                prompt = page.locator(".text_field_component").first.inner_text()
                if not page.locator(f"#preference_{label}").is_checked():  # a suggestion may have pre-selected it
                    option.click()
                assert page.locator(f"#preference_{label}").is_checked()
                if rationale:
                    page.locator("[contenteditable=true]").first.click()
                    page.keyboard.type(rationale)
                    page.screenshot(path=str(ARTIFACTS / "argilla-ui-answer.png"))  # the answer, before Submit
                page.locator("button.button--submit").click()
                seen.append((prompt.removeprefix("Prompt").strip(), label))
                _wait_for_submitted(client, "ui-pairs", len(seen))
            page.screenshot(path=str(ARTIFACTS / "argilla-ui-after-submit.png"))
        finally:
            browser.close()

    out_file = tmp_path / "ui-human.jsonl"
    code, out, err = run_align(capsys, "argilla", "pull", "--dataset", "ui-pairs", "-o", out_file,
                               "--home", argilla_home)
    assert code == 0, err
    pulled = load_records(out_file, "judgements")
    assert len(pulled) == 2, out
    by_label = {j.label: j for j in pulled}
    assert sorted(by_label) == ["b", "tie"]
    for prompt, label in seen:
        judgement = by_label[label]
        assert judgement.annotator == local.DEFAULT_USERNAME and judgement.judge.type == "human"
        assert prompt[:60] in " ".join(str(judgement.prompt).split()) or \
            " ".join(prompt.split())[:60] in " ".join(str(judgement.prompt).split())
    assert by_label["b"].rationale == "B is more useful (browser test)"
    assert by_label["b"].details["suggestion"]["agent"] == "judge:test-judge"

    # Pushing the same 20 again leaves 20 records and the two answers.
    code, out, _ = run_align(capsys, *push_args)
    assert code == 0 and "0 new, 20 already there" in out and "dataset now holds 20 records" in out
    before = out_file.read_bytes()
    run_align(capsys, "argilla", "pull", "--dataset", "ui-pairs", "-o", out_file, "--home", argilla_home)
    assert out_file.read_bytes() == before


def _wait_for_submitted(client: Any, dataset: str, count: int, timeout: float = 30.0) -> None:
    """The UI saves asynchronously: wait until the server holds ``count`` submitted responses."""
    from align.argilla.remote import iter_records

    ds = find_dataset(client, dataset)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        submitted = sum(r["status"] == "submitted" for rec in iter_records(client, ds, include="responses")
                        for r in rec.get("responses") or [])
        if submitted >= count:
            return
        time.sleep(0.3)
    raise AssertionError(f"the UI's answer {count} never reached the server")


def test_restart_keeps_the_data(argilla_home: Path, client: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """`down` stops every process by PID; `up` brings back the same datasets and records (runs last)."""
    before = {d.name: len(external_ids(client, d)) for d in client.datasets}
    state = local.read_state(argilla_home)
    code, out, _ = run_align(capsys, "argilla", "down", "--home", argilla_home)
    assert code == 0 and "server" in out and "noida-db" in out
    assert not any(local.is_alive(ref) for ref in state.processes.values())  # type: ignore[union-attr]
    code, out, _ = run_align(capsys, "argilla", "status", "--home", argilla_home)
    assert code == 1 and "stopped" in out
    code, out, err = run_align(capsys, "argilla", "up", "--home", argilla_home)
    assert code == 0, err
    again = connect(resolve_settings(home=argilla_home))
    assert {d.name: len(external_ids(again, d)) for d in again.datasets} == before


def test_pipeline_waits_for_people_then_carries_on(tmp_path: Path, argilla_home: Path, client: Any,
                                                   tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The label stage pushes with rule suggestions, stops while too few records are answered, and a rerun
    after people answered pulls their labels and finishes the loop without regenerating anything."""
    import json

    import yaml

    from align.pipeline import load_pipeline_config, run_pipeline

    monkeypatch.setenv("ALIGN_ARGILLA_HOME", str(argilla_home))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"Name a colour, please ({i})."}) + "\n"
                               for i in range(4)))
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules:\n  - name: short\n    max_chars: 40\n")
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump({
        "run_dir": str(tmp_path / "run"),
        "generate": {"model": str(tiny_model_dir), "prompts": str(prompts), "num_candidates": 2, "greedy_first": False,
                     "max_new_tokens": 8, "progress": False},
        "label": {"rules": str(rules), "argilla": {"dataset": "pipeline-people", "target": 2,
                                                             "task": "pairwise"}},
        "train": {"model": str(tiny_model_dir), "max_steps": 2, "per_device_train_batch_size": 2, "max_length": 64,
                  "ref_cache_dir": str(tmp_path / "cache")},
        "eval": {"prompts": str(prompts), "judge": str(rules), "max_new_tokens": 8},
    }))
    first = run_pipeline(load_pipeline_config(config))
    assert first.waiting and "0 of 2" in first.waiting
    assert first.ran == ["generate"]
    assert len(server_records(client, "pipeline-people")) == 4

    candidates = tmp_path / "run" / "candidates.jsonl"
    generated_at = candidates.stat().st_mtime_ns
    ids = record_ids(candidates, "pairwise")
    answer(client, "pipeline-people", {ids[0]: [("ann", {"preference": "a"}, "submitted")],
                                       ids[1]: [("ann", {"preference": "b"}, "submitted")]})
    _wait_for_submitted(client, "pipeline-people", 2)
    second = run_pipeline(load_pipeline_config(config))
    assert second.waiting is None and second.skipped == ["generate"]
    assert second.ran == ["label", "pairs", "train", "eval"]
    assert candidates.stat().st_mtime_ns == generated_at
    human = load_records(tmp_path / "run" / "judgements.jsonl", "judgements")
    assert sorted(j.label for j in human) == ["a", "b"] and {j.judge.type for j in human} == {"human"}
