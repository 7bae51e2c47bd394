"""Built-in task probes: shape, determinism, and answers re-derived by small independent solvers."""

from __future__ import annotations

import calendar
import hashlib
import json
import os
import re
import subprocess
import sys
from fractions import Fraction

import pytest

from importance.data import task_words
from importance.data.files import load_jsonl
from importance.data.tasks import TASKS, TaskItem, TaskSpec, generate, register_task, task_names
from importance.errors import ImpruneError

NAMES = ("knowledge", "retrieval", "logic", "decision", "semantic", "syntax", "inference", "math")
N = 256


@pytest.fixture(scope="module")
def items() -> dict[str, list[TaskItem]]:
    return {name: generate(name, N) for name in NAMES}


def _digest(names: tuple[str, ...]) -> str:
    blob = json.dumps({n: [[it.prompt, it.answer] for it in generate(n, 64, 7)] for n in names})
    return hashlib.sha256(blob.encode()).hexdigest()


# --- registry and generate() ----------------------------------------------------------------------------


def test_registry_has_the_eight_tasks() -> None:
    assert tuple(TASKS) == NAMES == tuple(task_names())
    for name, spec in TASKS.items():
        assert isinstance(spec, TaskSpec) and spec.name == name
        assert spec.description and "\n" not in spec.description


def test_register_task_decorator() -> None:
    try:
        @register_task("_probe_test")
        def _probe(rng, n):
            """A test task."""
            return [TaskItem(f"Number {rng.randint(0, 9)} is", " ok") for _ in range(n)]

        assert TASKS["_probe_test"].description == "A test task."
        assert generate("_probe_test", 5, 1) == generate("_probe_test", 5, 1)
        with pytest.raises(ValueError):
            register_task("_probe_test")(_probe)
    finally:
        TASKS.pop("_probe_test", None)


@pytest.mark.parametrize("name", NAMES)
def test_items_are_well_formed(name: str, items: dict[str, list[TaskItem]]) -> None:
    got = items[name]
    assert len(got) == N
    for it in got:
        assert isinstance(it, TaskItem)
        assert isinstance(it.prompt, str) and isinstance(it.answer, str)
        assert it.prompt.strip() and it.answer.strip()
        assert it.answer.startswith(" ") and not it.answer.startswith("  ")
        assert it.prompt == it.prompt.strip()  # the answer's own space separates them
        assert len((it.prompt + it.answer).split()) < 60
        assert len(it.answer.split()) <= 4


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_and_seeded(name: str, items: dict[str, list[TaskItem]]) -> None:
    assert generate(name, N) == items[name]
    assert generate(name, N, seed=0) == items[name]
    assert generate(name, N, seed=1) != items[name]
    assert generate(name, 40) == items[name][:40]  # a smaller n is a prefix
    assert generate(name, 0) == []


def test_deterministic_across_processes() -> None:
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from tests.test_tasks import _digest, NAMES; "
            "print(_digest(NAMES))")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code, root], capture_output=True, text=True, env=env,
                         check=True)
    assert out.stdout.strip() == _digest(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_prompts_distinct(name: str, items: dict[str, list[TaskItem]]) -> None:
    prompts = [it.prompt for it in items[name]]
    assert len(set(prompts)) == len(prompts)


def test_unknown_task_and_bad_n() -> None:
    with pytest.raises(ImpruneError) as err:
        generate("nonsense")
    msg = str(err.value)
    assert "nonsense" in msg and all(n in msg for n in NAMES) and "\n" not in msg
    with pytest.raises(ImpruneError):
        generate("all")
    for bad in (-1, 2.5, True):
        with pytest.raises(ImpruneError):
            generate("math", bad)  # type: ignore[arg-type]


def test_pool_tasks_repeat_only_past_their_pool() -> None:
    big = generate("semantic", 2000)
    assert len(big) == 2000
    pool = 3 * (len(task_words.SYNONYMS) + len(task_words.ANTONYMS))
    assert len({it.prompt for it in big[:pool]}) == pool


# --- math -----------------------------------------------------------------------------------------------

_OP = {"+": "+", "plus": "+", "-": "-", "minus": "-", "*": "*", "times": "*", "/": "/", "divided by": "/"}


def test_math_answers(items: dict[str, list[TaskItem]]) -> None:
    seen_ops = set()
    for it in items["math"]:
        m = re.search(r"(\d+) (\+|-|\*|/|plus|minus|times|divided by) (\d+)", it.prompt)
        assert m, it.prompt
        a, op, b = Fraction(int(m.group(1))), _OP[m.group(2)], Fraction(int(m.group(3)))
        value = {"+": a + b, "-": a - b, "*": a * b, "/": a / b}[op]
        assert value.denominator == 1 and value >= 0, it
        assert it.answer == f" {value.numerator}", it
        seen_ops.add(op)
    assert seen_ops == {"+", "-", "*", "/"}


# --- retrieval ------------------------------------------------------------------------------------------


def test_retrieval_answers(items: dict[str, list[TaskItem]]) -> None:
    lengths = set()
    for it in items["retrieval"]:
        _, rest = it.prompt.split(": ", 1)
        listing, question = rest.split(". ", 1)
        pairs = [re.split(r"[=\s]+", p) for p in listing.split(", ")]
        table = {p[0]: p[-1] for p in pairs}
        assert len(table) == len(pairs) and len(set(table.values())) == len(pairs), it
        asked = [k for k in table if re.search(rf"\b{re.escape(k)}\b", question)]
        assert len(asked) == 1, it
        assert it.answer == " " + table[asked[0]], it
        lengths.add(len(pairs))
    assert lengths == set(range(3, 9))


# --- logic ----------------------------------------------------------------------------------------------


def _literal(sentence: str) -> tuple[str, bool]:
    m = re.fullmatch(r"\w+ is (not )?(?:a )?(\w+)", sentence)
    assert m, sentence
    return m.group(2), m.group(1) is None


def _solve_syllogism(prompt: str) -> str:
    """Forward chaining over All/No rules; a conclusion follows only if it is derived."""
    m = re.fullmatch(r"(.+\.) (?:Can we conclude|Does it follow) that (.+)\? Answer:", prompt)
    assert m, prompt
    sing = lambda w: w[:-1] if w.endswith("s") else w
    rules, facts = [], set()
    for s in re.findall(r"[^.]+", m.group(1)):
        s = s.strip()
        if q := re.fullmatch(r"(All|No|Some) (\w+) are (\w+)", s):
            rules.append((q.group(1), sing(q.group(2)), sing(q.group(3))))
        elif s:
            facts.add(_literal(s))
    changed = True
    while changed:
        before = len(facts)
        for kind, a, b in rules:
            if kind == "All":
                facts |= {(b, True)} if (a, True) in facts else set()
                facts |= {(a, False)} if (b, False) in facts else set()
            elif kind == "No":
                facts |= {(b, False)} if (a, True) in facts else set()
                facts |= {(a, False)} if (b, True) in facts else set()
        changed = len(facts) != before
    assert not any((t, not v) in facts for t, v in facts), prompt  # premises are consistent
    return " Yes" if _literal(m.group(2)) in facts else " No"


def test_logic_answers(items: dict[str, list[TaskItem]]) -> None:
    answers = []
    for it in items["logic"]:
        assert it.answer == _solve_syllogism(it.prompt), it
        answers.append(it.answer)
    assert 0.35 < answers.count(" Yes") / len(answers) < 0.65


def test_logic_solver_on_known_forms() -> None:
    ask = "Can we conclude that"
    assert _solve_syllogism(f"All wugs are red. Tom is a wug. {ask} Tom is red? Answer:") == " Yes"
    assert _solve_syllogism(f"All wugs are red. Tom is red. {ask} Tom is a wug? Answer:") == " No"
    assert _solve_syllogism(f"No wugs are red. Tom is red. {ask} Tom is not a wug? Answer:") == " Yes"
    assert _solve_syllogism(f"Some wugs are red. Tom is a wug. {ask} Tom is red? Answer:") == " No"


# --- decision -------------------------------------------------------------------------------------------

_LOW = {"cheaper", "cheapest", "lighter", "lightest", "smaller", "smallest", "closer", "closest",
        "earlier", "earliest", "quicker", "quickest", "older", "oldest", "lower-rated", "lowest-rated"}
_HIGH = {"more expensive", "most expensive", "heavier", "heaviest", "larger", "largest", "farther",
         "farthest", "later", "latest", "slower", "slowest", "newer", "newest", "higher-rated",
         "highest-rated"}


def test_decision_answers(items: dict[str, list[TaskItem]]) -> None:
    rules = set()
    for it in items["decision"]:
        m = re.fullmatch(r"(?:Pick|Choose|Select) the ([\w -]+) \w+\. (.+)\. Answer:", it.prompt)
        assert m, it.prompt
        rule = m.group(1)
        assert rule in _LOW | _HIGH, rule
        values = {}
        for option in m.group(2).split(", "):
            label, rest = option.split(" ", 1)
            t = re.search(r"(\d+):(\d\d)", rest)  # a clock time, else the first number
            values[label] = int(t[1]) * 60 + int(t[2]) if t else int(re.search(r"\d+", rest).group())
        assert 2 <= len(values) <= 4 and len(set(values.values())) == len(values)
        best = (min if rule in _LOW else max)(values, key=values.get)
        assert it.answer == f" {best}", it
        rules.add(rule)
    assert len(rules) >= 12


# --- inference ------------------------------------------------------------------------------------------

_COMPARE = {"taller": ("taller", 1), "shorter": ("taller", -1), "older": ("older", 1),
            "younger": ("older", -1), "faster": ("faster", 1), "slower": ("faster", -1),
            "heavier": ("heavier", 1), "lighter": ("heavier", -1), "stronger": ("stronger", 1),
            "weaker": ("stronger", -1), "richer": ("richer", 1), "poorer": ("richer", -1)}
_SUPERLATIVE = {"tallest": "taller", "shortest": "shorter", "oldest": "older", "youngest": "younger",
                "fastest": "faster", "slowest": "slower", "heaviest": "heavier", "lightest": "lighter",
                "strongest": "stronger", "weakest": "weaker", "richest": "richer", "poorest": "poorer"}


def _reach(edges: set[tuple[str, str]], a: str, b: str) -> bool:
    todo, seen = [a], {a}
    while todo:
        x = todo.pop()
        for u, v in edges:
            if u == x and v not in seen:
                if v == b:
                    return True
                seen.add(v)
                todo.append(v)
    return False


def _extreme(edges: set[tuple[str, str]], top: bool) -> str:
    nodes = {x for e in edges for x in e}
    hits = [x for x in nodes if not any((v if top else u) == x for u, v in edges)]
    assert len(hits) == 1
    return hits[0]


def _solve_inference(prompt: str) -> str:
    """Edges point from more to less (comparatives), earlier to later (time), inner to outer (containment)."""
    edges: set[tuple[str, str]] = set()
    sentences = [s.strip() for s in re.findall(r"[^.?]+[.?]", prompt.removesuffix(" Answer:"))]
    *premises, question = sentences
    axis = None
    for s in premises:
        if m := re.fullmatch(r"(\w+) is (\w+) than (\w+)\.", s):
            axis, sign = _COMPARE[m.group(2)]
            edges.add((m.group(1), m.group(3)) if sign > 0 else (m.group(3), m.group(1)))
        elif m := re.fullmatch(r"The (.+) is in the (.+)\.", s):
            edges.add((m.group(1), m.group(2)))
        elif m := re.fullmatch(r"(\w+) (.+) (before|after) (\w+)\.", s):
            a, b = m.group(1), m.group(4)
            edges.add((a, b) if m.group(3) == "before" else (b, a))
        else:
            raise AssertionError(s)
    if m := re.fullmatch(r"Who is the (\w+)\?", question):
        word_axis, sign = _COMPARE[_SUPERLATIVE[m.group(1)]]
        assert word_axis == axis
        return " " + _extreme(edges, top=sign > 0)  # the top has nobody above it on the axis
    if m := re.fullmatch(r"Who is (\w+), (\w+) or (\w+)\?", question):
        x, y = m.group(2), m.group(3)
        x_more = _reach(edges, x, y)
        assert x_more != _reach(edges, y, x)
        return " " + (x if x_more == (_COMPARE[m.group(1)][1] > 0) else y)
    if m := re.fullmatch(r"Who .+ (first|last)\?", question):
        return " " + _extreme(edges, top=m.group(1) == "first")
    m = re.fullmatch(r"(?:Is the (.+) in the (.+)|Did (\w+) .+ before (\w+))\?", question)
    assert m, question
    a, b = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
    forward, backward = _reach(edges, a, b), _reach(edges, b, a)
    assert forward != backward, prompt  # every asked pair is decided by the premises
    return " Yes" if forward else " No"


def test_inference_answers(items: dict[str, list[TaskItem]]) -> None:
    for it in items["inference"]:
        assert it.answer == _solve_inference(it.prompt), it
    yes_no = [it.answer for it in items["inference"] if it.answer in (" Yes", " No")]
    assert yes_no.count(" Yes") and yes_no.count(" No")


def test_inference_solver_on_the_brief_example() -> None:
    prompt = "Ann is taller than Bob. Bob is taller than Cy. Who is the shortest? Answer:"
    assert _solve_inference(prompt) == " Cy"
    assert _solve_inference(prompt.replace("shortest", "tallest")) == " Ann"
    assert _solve_inference("Ann is shorter than Bob. Cy is shorter than Ann. Who is taller, Cy or Bob? "
                            "Answer:") == " Bob"


# --- syntax ---------------------------------------------------------------------------------------------

_IRREGULAR = {"mouse": "mice", "child": "children", "foot": "feet", "tooth": "teeth", "man": "men",
              "woman": "women", "goose": "geese", "person": "people", "sheep": "sheep", "knife": "knives",
              "leaf": "leaves", "wolf": "wolves", "shelf": "shelves", "potato": "potatoes"}
_PLURAL_HEADS = {"children", "men", "women"}


def _plural(noun: str) -> str:
    if noun in _IRREGULAR:
        return _IRREGULAR[noun]
    if re.search(r"(s|x|ch|sh)$", noun):
        return noun + "es"
    if re.search(r"[^aeiou]y$", noun):
        return noun[:-1] + "ies"
    return noun + "s"


def _subject_person(subject: str) -> str:
    first = subject.split()[-1]
    if subject == "I":
        return "I"
    if subject == "We":
        return "we"
    if first.endswith("s") or first in _PLURAL_HEADS:
        return "they"
    male = {"boy", "Tom", "uncle", "man", "king"}
    female = {"girl", "Mary", "sister", "woman", "queen"}
    assert first in male | female, subject
    return "he" if first in male else "she"


def test_syntax_answers(items: dict[str, list[TaskItem]]) -> None:
    styles = set()
    reflexive = {"he": "himself", "she": "herself", "they": "themselves", "we": "ourselves", "I": "myself"}
    for it in items["syntax"]:
        p, a = it.prompt, it.answer.strip()
        if a in ("is", "are", "was", "were"):
            head = re.match(r"(?:Yesterday, the|The) (\w+) ", p).group(1)
            plural = head.endswith("s") or head in _PLURAL_HEADS
            past = p.startswith("Yesterday")
            assert a == (("were" if plural else "was") if past else ("are" if plural else "is")), it
            styles.add("agreement")
        elif m := re.search(r"(?:one|this) (\w+),", p):
            assert a == _plural(m.group(1)), it
            styles.add("number")
        elif m := re.fullmatch(r"(.+?) (?:fixed|built|cleaned|painted|cooked|carried|planted|solved) .+", p):
            assert a == reflexive[_subject_person(m.group(1))], it
            styles.add("reflexive")
        elif m := re.fullmatch(r"(.+?) (am|is|are|was|were|can|will|has|have) [\w ]+, (\w+)'t", p):
            assert a == _subject_person(m.group(1)), it
            styles.add("tag")
        else:
            raise AssertionError(it)
    assert styles == {"agreement", "number", "reflexive", "tag"}


# --- knowledge and semantic -----------------------------------------------------------------------------


def test_knowledge_consistent_and_broad() -> None:
    pool = generate("knowledge", 3000)
    answer_of: dict[str, str] = {}
    for it in pool:
        assert answer_of.setdefault(it.prompt, it.answer) == it.answer, it
    assert len(answer_of) >= 400
    assert answer_of["The capital of France is"] == " Paris"
    assert answer_of["The chemical symbol for gold is"] == " Au"
    assert answer_of['"Pride and Prejudice" was written by'] == " Jane Austen"
    months, days = list(calendar.month_name)[1:], list(calendar.day_name)
    for names, unit in ((months, "month"), (days, "day")):
        for i, x in enumerate(names):
            assert answer_of[f"The {unit} after {x} is"] == " " + names[(i + 1) % len(names)]
            assert answer_of[f"The {unit} before {x} is"] == " " + names[i - 1]
    assert answer_of["The third planet from the Sun is"] == " Earth"
    assert answer_of["Counting outward from the Sun, Neptune is planet number"] == " 8"


def test_semantic_lists_and_consistency() -> None:
    assert len(set(task_words.SYNONYMS)) >= 80 and len(set(task_words.ANTONYMS)) >= 80
    for pairs in (task_words.SYNONYMS, task_words.ANTONYMS):
        words = [w for w, _ in pairs]
        assert len(set(words)) == len(words)
        assert all(w != a for w, a in pairs)
    answer_of: dict[str, str] = {}
    for it in generate("semantic", 1000):
        assert answer_of.setdefault(it.prompt, it.answer) == it.answer, it
    assert answer_of["The opposite of hot is"] == " cold"
    assert answer_of["A synonym of big is"] == " large"


# --- load_jsonl -----------------------------------------------------------------------------------------


def test_load_jsonl_round_trip(tmp_path) -> None:
    src = generate("math", 20) + [TaskItem('Quote "x" and ünïcode:', " ✓")]
    path = tmp_path / "tasks.jsonl"
    lines = [json.dumps({"prompt": it.prompt, "answer": it.answer, "distractors": list(it.distractors), "extra": 1})
             for it in src]
    path.write_text("\n".join(lines[:5]) + "\n\n" + "\n".join(lines[5:]) + "\n", encoding="utf-8")
    assert load_jsonl(path) == src
    assert load_jsonl(str(path)) == src
    array = tmp_path / "tasks.json"
    array.write_text(json.dumps([{"prompt": it.prompt, "answer": it.answer} for it in src], indent=1))
    assert load_jsonl(array) == [TaskItem(it.prompt, it.answer) for it in src]  # no distractors given: none


@pytest.mark.parametrize("text, where", [
    ('{"prompt": "a", "answer": " b"}\n{"prompt": "c", "answer": \n', "line 2"),
    ('{"prompt": "a", "answer": " b"}\n\n{"prompt": "c"}\n', "line 3"),
    ('{"answer": " b"}\n', "line 1"),
    ('{"prompt": "a", "answer": 3}\n', "line 1"),
    ('{"prompt": "a", "answer": " b", "distractors": " c"}\n', "line 1"),
    ('{"prompt": "a", "answer": ""}\n', "line 1"),
    ('["a", " b"]\n', "item 1"),
    ('"a"\n{"prompt": "a", "answer": " b"}\n', "line 1"),
    ('not json\n', "line 1"),
    ('[{"prompt": "a", "answer": " b"}, {"prompt": "a"}]', "item 2"),
])
def test_load_jsonl_bad_lines(tmp_path, text: str, where: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(text)
    with pytest.raises(ImpruneError) as err:
        load_jsonl(path)
    assert str(path) in str(err.value) and where in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("text", ["", "\n  \n", "[]"])
def test_load_jsonl_empty(tmp_path, text: str) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text(text)
    with pytest.raises(ImpruneError, match="no items"):
        load_jsonl(path)


def test_load_jsonl_missing_file(tmp_path) -> None:
    with pytest.raises(ImpruneError, match="cannot read"):
        load_jsonl(tmp_path / "nope.jsonl")


# --- distractors (the probes as multiple-choice tasks) ---------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_distractors_well_formed(name: str, items: dict[str, list[TaskItem]]) -> None:
    single = 0
    for it in items[name]:
        assert it.choices[0] == it.answer and len(set(it.choices)) == len(it.choices), it
        for d in it.distractors:
            assert d.startswith(" ") and not d.startswith("  ") and d.strip(), it
        single += not it.distractors
    assert single <= (N // 20 if name == "syntax" else 0)  # only "one sheep ... three sheep" has no wrong form


def test_distractors_same_kind(items: dict[str, list[TaskItem]]) -> None:
    for it in items["math"]:
        assert len(it.choices) == 4 and all(c.strip().isdigit() for c in it.choices)
        assert all(abs(int(c) - int(it.answer)) in (1, 2, 10) for c in it.distractors)
    for it in items["retrieval"]:  # the other values of the listing, all of them
        listed = re.findall(r"(?:=| |likes )(\w+)(?:,|\.)", it.prompt.split(". ")[0] + ".")
        assert sorted(c.strip() for c in it.choices) == sorted(listed), it
    for it in items["decision"]:
        labels = re.findall(r"(?:\. |, )([A-D]) ", it.prompt)
        assert sorted(c.strip() for c in it.choices) == labels
    for it in items["logic"]:
        assert sorted(it.choices) == [" No", " Yes"]
    verbs = {" is": " are", " are": " is", " was": " were", " were": " was"}
    for it in items["syntax"]:
        if it.answer in verbs:
            assert it.distractors == (verbs[it.answer],)
    capitals = {c for _, c in task_words.CAPITALS}
    for it in generate("knowledge", 400):
        if it.prompt.startswith("The capital of"):
            assert {c.strip() for c in it.choices} <= capitals and len(it.choices) == 4


def test_semantic_distractors_not_linked_words(items: dict[str, list[TaskItem]]) -> None:
    pairs = {*task_words.SYNONYMS, *task_words.ANTONYMS, *task_words.RELATED}
    linked = {frozenset(p) for p in pairs}
    for it in items["semantic"]:
        for d in it.distractors:
            assert frozenset((it.answer.strip(), d.strip())) not in linked, it


def test_distractors_do_not_change_the_items() -> None:
    # the distractor rng is seeded by the prompt: prompts and answers are those a seed always drew
    for name in NAMES:
        a, b = generate(name, 30, 3), generate(name, 60, 3)
        assert a == b[:30] and [it.distractors for it in a] == [it.distractors for it in b[:30]]
