"""Built-in task probes: small generated prompt/answer sets for task-specific importance scoring.

Each task is a deterministic, offline generator of ``TaskItem(prompt, answer)`` pairs phrased as plain text
completion ("The capital of France is" -> " Paris"). imprune scores a model on a task with a loss over the
answer tokens only, and draws one attention-head heatmap per task, so the answers here must be right
independently of any model: they are computed (math, retrieval, logic, decision, inference, syntax) or
looked up in hand-written lists (knowledge, semantic; see ``importance.data.task_words``). Answers start with a
space and are one to a few words; prompt plus answer stays well under 60 words (fits 128-token windows).

Every item also carries ``distractors``: wrong answers of the same kind (other capitals, the other listed
values or labels, Yes/No, nearby numbers, the other verb number, ...), so a probe is a multiple-choice task
too (``pruning.eval.tasks``: accuracy = the answer has the highest log-likelihood among ``choices``).
Distractors come from a generator of their own, seeded by the item's prompt, so adding them never changed
which items a seed draws.

Tasks (registry names): knowledge, retrieval, logic, decision, semantic, syntax, inference, math.
``generate(name, n, seed)`` returns the same items for the same arguments in every process; items within
a task are distinct while the task's space allows. ``importance.data.files.load_jsonl`` reads user tasks.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from importance.data import task_words as W
from importance.errors import ImpruneError


@dataclass(frozen=True)
class TaskItem:
    """One probe: the loss counts only the tokens of ``answer`` (which follows ``prompt`` directly);
    ``distractors`` are wrong answers in the same form (leading space), empty for user items."""

    prompt: str
    answer: str
    distractors: tuple[str, ...] = ()

    @property
    def choices(self) -> tuple[str, ...]:
        """The answer first, then the distractors."""
        return (self.answer, *self.distractors)


TaskGenerator = Callable[[random.Random, int], list[TaskItem]]


@dataclass(frozen=True)
class TaskSpec:
    name: str
    description: str
    generator: TaskGenerator


TASKS: dict[str, TaskSpec] = {}


def register_task(name: str, description: str | None = None) -> Callable[[TaskGenerator], TaskGenerator]:
    """Decorator adding ``fn(rng, n) -> list[TaskItem]`` to ``TASKS`` (description: its docstring)."""

    def deco(fn: TaskGenerator) -> TaskGenerator:
        if name in TASKS:
            raise ValueError(f"task '{name}' is already registered")
        doc = (fn.__doc__ or "").strip().splitlines()
        TASKS[name] = TaskSpec(name, description or (doc[0] if doc else name), fn)
        return fn

    return deco


def task_names() -> list[str]:
    """Registered task names, in registration order."""
    return list(TASKS)


def generate(name: str, n: int = 256, seed: int = 0) -> list[TaskItem]:
    """``n`` items of task ``name``; the same (name, n, seed) gives the same items in any process."""
    spec = TASKS.get(name)
    if spec is None:
        raise ImpruneError(f"unknown task '{name}'; use one of: {', '.join(TASKS)}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ImpruneError(f"the number of task items must be a non-negative integer, got {n!r}")
    # A str seed goes through sha512 in random.Random: stable across processes (unlike hash()).
    items = spec.generator(random.Random(f"imprune-task:{name}:{seed}"), n)
    if len(items) != n:  # a generator bug, not a user error
        raise RuntimeError(f"task '{name}' made {len(items)} items instead of {n}")
    return items


# --- helpers --------------------------------------------------------------------------------------------


def _draw(rng: random.Random, n: int, make: Callable[[random.Random], TaskItem]) -> list[TaskItem]:
    """``n`` items from ``make``: distinct prompts until too many draws repeat (then repeats are kept)."""
    items: list[TaskItem] = []
    seen: set[str] = set()
    misses, budget = 0, 50 * n + 1000
    while len(items) < n:
        item = make(rng)
        if item.prompt in seen and misses < budget:
            misses += 1
            continue
        seen.add(item.prompt)
        items.append(item)
    return items


def _from_pool(rng: random.Random, pool: Sequence[TaskItem], n: int) -> list[TaskItem]:
    """``n`` items drawn from a fixed pool without repeats, reshuffling once the pool runs out."""
    out: list[TaskItem] = []
    while len(out) < n:
        batch = list(pool)
        rng.shuffle(batch)
        out.extend(batch[: n - len(out)])
    return out


def _item(prompt: str, answer: object, others: Sequence[object] = ()) -> TaskItem:
    wrong = tuple(dict.fromkeys(f" {o}" for o in others if str(o) != str(answer)))  # distinct, never the answer
    return TaskItem(prompt, f" {answer}", wrong)


def _others(prompt: str, answer: object, pool: Sequence[object], k: int = 3,
            exclude: Sequence[object] = ()) -> list[str]:
    """Up to ``k`` distinct members of ``pool`` other than ``answer`` (and ``exclude``), drawn by an rng seeded
    with the prompt: the same item always gets the same distractors, and the item stream's rng is untouched."""
    skip = {str(answer), *map(str, exclude)}
    cands = sorted({str(c) for c in pool} - skip)
    return random.Random(f"imprune-distractors:{prompt}").sample(cands, min(k, len(cands)))


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _pool(pairs: Sequence[tuple[str, str]], templates: Sequence[str],
          related: Callable[[str, str], Sequence[str]] | None = None) -> list[TaskItem]:
    """Every (template, pair) item; a template's ``{x}`` is the pair's first word, ``{X}`` capitalized. The
    distractors are three other answers of the same list (not those ``related(x, answer)`` names)."""
    answers = [a for _, a in pairs]
    out = []
    for t in templates:
        for x, a in pairs:
            prompt = t.format(x=x, X=_cap(x))
            out.append(_item(prompt, a, _others(prompt, a, answers, exclude=related(x, a) if related else ())))
    return out


# --- 1. knowledge ---------------------------------------------------------------------------------------


def _knowledge_pool() -> list[TaskItem]:
    els = W.ELEMENTS
    pool = [
        *_pool(W.CAPITALS, ("The capital of {x} is", "The capital city of {x} is",
                            "Q: What is the capital of {x}? A:")),
        *_pool([(e, s) for e, s, _ in els], ("The chemical symbol for {x} is",
                                             "In chemistry, the symbol of {x} is")),
        *_pool([(s, e) for e, s, _ in els], ("The chemical element with the symbol {x} is",)),
        *_pool([(e, str(z)) for e, _, z in els], ("The atomic number of {x} is",)),
        *_pool([(W.ORDINALS[i], p) for i, p in enumerate(W.PLANETS)], ("The {x} planet from the Sun is",)),
        *_pool([(p, str(i + 1)) for i, p in enumerate(W.PLANETS)],
               ("Counting outward from the Sun, {x} is planet number",)),
        *_pool(W.LANGUAGES, ("The main language spoken in {x} is", "Most people in {x} speak")),
        *_pool(W.BOOKS, ('"{x}" was written by', 'The author of "{x}" is')),
        *_pool(W.ANIMAL_CLASSES, ("Biologically, the {x} belongs to the class of",
                                  "Zoologists classify the {x} among the")),
        *_pool(W.CONTINENTS, ("{X} is a country in", "{X} is located on the continent of")),
        *[_item(p, a, W.MISC_DISTRACTORS[p]) for p, a in W.MISC_FACTS],
    ]
    for names, unit in ((W.MONTHS, "month"), (W.WEEKDAYS, "day")):
        k = len(names)
        pool += _pool([(names[i], names[(i + 1) % k]) for i in range(k)], (f"The {unit} after {{x}} is",))
        pool += _pool([(names[i], names[i - 1]) for i in range(k)], (f"The {unit} before {{x}} is",))
    return list({it.prompt: it for it in reversed(pool)}.values())[::-1]  # first item per prompt


@register_task("knowledge")
def _knowledge(rng: random.Random, n: int) -> list[TaskItem]:
    """Fact recall: capitals, element symbols, planets, languages, authors, animal classes, calendar."""
    return _from_pool(rng, _knowledge_pool(), n)


# --- 2. retrieval ---------------------------------------------------------------------------------------


@register_task("retrieval")
def _retrieval(rng: random.Random, n: int) -> list[TaskItem]:
    """Look up the value of a key in a list of 3-8 key/value pairs given in the prompt."""

    def make(r: random.Random) -> TaskItem:
        k = r.randint(3, 8)
        style = r.randrange(3)
        keys = r.sample(W.KEY_NOUNS if style == 0 else W.NAMES, k)
        vals = r.sample(W.COLORS, k) if style == 2 else [str(v) for v in r.sample(range(100, 1000), k)]
        q = r.randrange(k)
        if style == 0:  # distractors: the other values of the listing
            listing = ", ".join(f"{a}={b}" for a, b in zip(keys, vals))
            return _item(f"Codes: {listing}. The code of {keys[q]} is", vals[q], vals)
        if style == 1:
            listing = ", ".join(f"{a} {b}" for a, b in zip(keys, vals))
            return _item(f"Room numbers: {listing}. {keys[q]}'s room number is", vals[q], vals)
        listing = ", ".join(f"{a} likes {b}" for a, b in zip(keys, vals))
        return _item(f"Favorite colors: {listing}. The favorite color of {keys[q]} is", vals[q], vals)

    return _draw(rng, n, make)


# --- 3. logic -------------------------------------------------------------------------------------------


@register_task("logic")
def _logic(rng: random.Random, n: int) -> list[TaskItem]:
    """Syllogisms over made-up categories: does the conclusion follow? Valid and invalid forms (Yes/No)."""

    def make(r: random.Random) -> TaskItem:
        t = r.choice(W.NAMES)
        x, y = r.sample(W.NONCE_NOUNS, 2)
        p = r.choice(W.PROPERTIES)
        isx, notx, isp, notp = f"{t} is a {x}", f"{t} is not a {x}", f"{t} is {p}", f"{t} is not {p}"
        all_xp, no_xp, all_xy = f"All {x}s are {p}.", f"No {x}s are {p}.", f"All {x}s are {y}s."
        forms: list[tuple[list[str], str, bool]] = [
            ([all_xp, isx], isp, True),  # modus ponens
            ([all_xp, isp], isx, False),  # affirming the consequent
            ([all_xp, notx], notp, False),  # denying the antecedent
            ([all_xp, notp], notx, True),  # modus tollens
            ([no_xp, isx], notp, True),
            ([no_xp, isx], isp, False),
            ([no_xp, isp], notx, True),
            ([all_xy, f"All {y}s are {p}.", isx], isp, True),  # chained universal
            ([all_xy, f"All {y}s are {p}.", isp], isx, False),  # chain read backwards
            ([all_xy, f"No {y}s are {p}.", isx], notp, True),
            ([all_xy, f"{t} is a {y}"], isx, False),  # undistributed middle
            ([f"Some {x}s are {p}.", isx], isp, False),
        ]
        premises, conclusion, valid = r.choice(forms)
        text = " ".join(s if s.endswith(".") else s + "." for s in premises)
        ask = r.choice(("Can we conclude that", "Does it follow that"))
        return _item(f"{text} {ask} {conclusion}? Answer:", "Yes" if valid else "No", ("Yes", "No"))

    return _draw(rng, n, make)


# --- 4. decision ----------------------------------------------------------------------------------------

# (noun, attribute with {} for the value, value range or None for clock times, words picking the lowest
# value (comparative, superlative), words picking the highest)
_RULES: tuple[tuple[str, str, tuple[int, int] | None, tuple[str, str], tuple[str, str]], ...] = (
    ("option", "costs {} dollars", (3, 99), ("cheaper", "cheapest"), ("more expensive", "most expensive")),
    ("bag", "weighs {} kg", (2, 40), ("lighter", "lightest"), ("heavier", "heaviest")),
    ("room", "is {} square meters", (8, 60), ("smaller", "smallest"), ("larger", "largest")),
    ("shop", "is {} km away", (1, 50), ("closer", "closest"), ("farther", "farthest")),
    ("train", "leaves at {}", None, ("earlier", "earliest"), ("later", "latest")),
    ("route", "takes {} minutes", (5, 90), ("quicker", "quickest"), ("slower", "slowest")),
    ("house", "was built in {}", (1850, 2020), ("older", "oldest"), ("newer", "newest")),
    ("hotel", "is rated {} out of 10", (1, 10), ("lower-rated", "lowest-rated"),
     ("higher-rated", "highest-rated")),
)


@register_task("decision")
def _decision(rng: random.Random, n: int) -> list[TaskItem]:
    """Choose among 2-4 labelled options by a stated rule (cheaper, heavier, closer, earlier, ...)."""

    def make(r: random.Random) -> TaskItem:
        noun, attr, span, low_words, high_words = r.choice(_RULES)
        k = r.randint(2, 4)
        if span is None:  # clock times 6:00-22:55 in 5-minute steps, compared in minutes
            values = r.sample(range(6 * 60, 23 * 60, 5), k)
            shown = [f"{v // 60}:{v % 60:02d}" for v in values]
        else:
            values = r.sample(range(span[0], span[1] + 1), k)
            shown = [str(v) for v in values]
        want_low = r.random() < 0.5
        words = low_words if want_low else high_words
        rule = words[0] if k == 2 else words[1]
        pick = values.index(min(values) if want_low else max(values))
        labels = "ABCD"
        options = ", ".join(f"{labels[i]} {attr.format(shown[i])}" for i in range(k))
        verb = r.choice(("Pick", "Choose", "Select"))
        return _item(f"{verb} the {rule} {noun}. {options}. Answer:", labels[pick], labels[:k])

    return _draw(rng, n, make)


# --- 5. semantic ----------------------------------------------------------------------------------------


@register_task("semantic")
def _semantic(rng: random.Random, n: int) -> list[TaskItem]:
    """Synonyms and antonyms from hand-written word pairs."""
    related = _word_clusters()
    near = lambda x, a: sorted(related[x] | related[a])  # noqa: E731
    pool = _pool(W.SYNONYMS, ("A synonym of {x} is", "Another word for {x} is", "{X} means the same as"), near)
    pool += _pool(W.ANTONYMS, ("The opposite of {x} is", "An antonym of {x} is", "{X} is the opposite of"), near)
    return _from_pool(rng, pool, n)


def _word_clusters() -> dict[str, set[str]]:
    """Word -> every word linked to it through synonym, antonym and ``W.RELATED`` pairs (its connected
    component): a distractor from another cluster is never a second right answer the lists know of."""
    links: dict[str, set[str]] = {}
    for a, b in (*W.SYNONYMS, *W.ANTONYMS, *W.RELATED):
        links.setdefault(a, set()).add(b)
        links.setdefault(b, set()).add(a)
    comp: dict[str, set[str]] = {}
    for start in links:
        if start in comp:
            continue
        seen, todo = {start}, [start]
        while todo:
            for nxt in links[todo.pop()] - seen:
                seen.add(nxt)
                todo.append(nxt)
        for w in seen:
            comp[w] = seen
    return comp


# --- 6. syntax ------------------------------------------------------------------------------------------

_STATE, _MOOD, _DONE = ("tired", "late", "ready", "at home"), ("angry", "busy", "ill"), ("finished", "left")
_CAN = ("can", "can't", ("swim", "cook", "drive"))
_WILL = ("will", "won't", ("come", "help", "call"))
_TAG_AUX = {  # subject kind -> (auxiliary, negated tag, predicate choices)
    "sg": (("is", "isn't", _STATE), ("was", "wasn't", _MOOD), _CAN, _WILL, ("has", "hasn't", _DONE)),
    "pl": (("are", "aren't", _STATE), ("were", "weren't", _MOOD), _CAN, _WILL, ("have", "haven't", _DONE)),
    "I": (("am", "aren't", _STATE), ("was", "wasn't", _MOOD), _CAN, _WILL),
}


@register_task("syntax")
def _syntax(rng: random.Random, n: int) -> list[TaskItem]:
    """Grammatical continuation: agreement across attractors, plurals, reflexives, tag questions."""

    def make(r: random.Random) -> TaskItem:
        style = r.randrange(6)
        if style <= 2:  # subject-verb agreement; the attractor noun mostly has the other number
            head, place = r.choice(W.NOUNS), r.choice(W.PLACES)
            plural = r.random() < 0.5
            attr_plural = (not plural) if r.random() < 0.75 else plural
            subj, other = head[plural], place[attr_plural]
            prep = r.choice(W.PLACE_PREPOSITIONS)
            if style == 0:
                return _item(f"The {subj} {prep} the {other}", "are" if plural else "is", ("is", "are"))
            if style == 1:
                return _item(f"Yesterday, the {subj} {prep} the {other}", "were" if plural else "was",
                             ("was", "were"))
            other = r.choice(W.PEOPLE)[attr_plural]  # an animate subject for the relative clause
            return _item(f"The {subj} that the {other} {r.choice(W.PAST_VERBS)}", "are" if plural else "is",
                         ("is", "are"))
        if style == 3:  # noun number after a numeral or a plural determiner
            sing, plur = r.choice(W.PLURALS)
            num = r.choice(W.NUMBER_WORDS)
            template = r.choice((f"I have one {sing}, and my neighbor has {num}",
                                 f"On Monday we saw one {sing}, and on Tuesday we saw {num}",
                                 f"I like this {sing}, but my friend prefers those"))
            return _item(template, plur, (sing,))  # "sheep": no distractor, so no choice (skipped in accuracy)
        subj, refl, pron = r.choice(W.SUBJECTS)
        if style == 4:  # reflexive pronoun agreeing with the subject
            prompt = f"{subj} {r.choice(W.SOLO_ACTIONS)} all by"
            return _item(prompt, refl, _others(prompt, refl, [s[1] for s in W.SUBJECTS]))
        kind = "I" if subj == "I" else "pl" if pron in ("they", "we") else "sg"
        aux, tag, preds = r.choice(_TAG_AUX[kind])
        prompt = f"{subj} {aux} {r.choice(preds)}, {tag}"
        return _item(prompt, pron, _others(prompt, pron, [s[2] for s in W.SUBJECTS]))

    return _draw(rng, n, make)


# --- 7. inference ---------------------------------------------------------------------------------------


def _chain_premises(r: random.Random, chain: Sequence[str], forward: str, backward: str) -> str:
    """One sentence per neighbouring pair (a before b in ``chain``), worded either way, in shuffled order."""
    sents = [f"{a} {forward} {b}." if r.random() < 0.5 else f"{b} {backward} {a}." for a, b in zip(chain,
                                                                                                    chain[1:])]
    r.shuffle(sents)
    return " ".join(sents)


@register_task("inference")
def _inference(rng: random.Random, n: int) -> list[TaskItem]:
    """Conclusions from premises: transitive orderings, containment, before/after in time."""

    def make(r: random.Random) -> TaskItem:
        style = r.randrange(4)
        if style <= 1:  # chain[0] is the most <comparative>
            comp, opp, sup, opp_sup = r.choice(W.COMPARATIVES)
            chain = r.sample(W.NAMES, r.randint(3, 5))
            text = _chain_premises(r, chain, f"is {comp} than", f"is {opp} than")
            high = r.random() < 0.5
            if style == 0:
                return _item(f"{text} Who is the {sup if high else opp_sup}? Answer:",
                             chain[0] if high else chain[-1], chain)
            i, j = sorted(r.sample(range(len(chain)), 2))
            pair = [chain[i], chain[j]]
            r.shuffle(pair)
            return _item(f"{text} Who is {comp if high else opp}, {pair[0]} or {pair[1]}? Answer:",
                         chain[i] if high else chain[j], pair)
        if style == 2:  # containment: chain[0] is inside chain[1], inside chain[2], ...
            kind = r.choice(W.CONTAINER_KINDS)
            boxes = [f"{color} {kind}" for color in r.sample(W.COLORS, r.randint(2, 4))]
            chain = [r.choice(W.SMALL_THINGS), *boxes]
            sents = [f"The {a} is in the {b}." for a, b in zip(chain, chain[1:])]
            r.shuffle(sents)
            if r.random() < 0.5:
                i, j = sorted(r.sample(range(len(chain)), 2))
                return _item(f"{' '.join(sents)} Is the {chain[i]} in the {chain[j]}? Answer:", "Yes", ("No",))
            j, i = sorted(r.sample(range(1, len(chain)), 2))  # outer object asked to be in an inner container
            return _item(f"{' '.join(sents)} Is the {chain[i]} in the {chain[j]}? Answer:", "No", ("Yes",))
        past, base = r.choice(W.EVENTS)  # time order: chain[0] first
        chain = r.sample(W.NAMES, r.randint(3, 5))
        text = _chain_premises(r, chain, f"{past} before", f"{past} after")
        ask = r.randrange(3)
        if ask < 2:
            return _item(f"{text} Who {past} {'first' if ask == 0 else 'last'}? Answer:",
                         chain[0] if ask == 0 else chain[-1], chain)
        a, b = r.sample(chain, 2)
        return _item(f"{text} Did {a} {base} before {b}? Answer:",
                     "Yes" if chain.index(a) < chain.index(b) else "No", ("Yes", "No"))

    return _draw(rng, n, make)


# --- 8. math --------------------------------------------------------------------------------------------

_OPS = (("+", "plus"), ("-", "minus"), ("*", "times"), ("/", "divided by"))


@register_task("math")
def _math(rng: random.Random, n: int) -> list[TaskItem]:
    """Integer arithmetic: +, -, *, and division with exact results."""

    def make(r: random.Random) -> TaskItem:
        op = r.randrange(4)
        if op == 0:
            a, b = r.randint(100, 999) if r.random() < 0.25 else r.randint(2, 99), r.randint(2, 99)
            result = a + b
        elif op == 1:
            a = r.randint(10, 199)
            b = r.randint(1, a - 1)
            result = a - b
        elif op == 2:
            a, b = r.randint(2, 12), r.randint(2, 25)
            if r.random() < 0.5:
                a, b = b, a
            result = a * b
        else:
            b, result = r.randint(2, 12), r.randint(2, 20)
            a = b * result
        sym, word = _OPS[op]
        template = r.choice(("What is {a} {s} {b}? Answer:", "{a} {s} {b} =", "Q: What is {a} {w} {b}? A:",
                             "Compute {a} {s} {b}. Answer:"))
        prompt = template.format(a=a, b=b, s=sym, w=word)
        near = [result + d for d in (-10, -2, -1, 1, 2, 10) if result + d >= 0]  # same size class, off by a slip
        return _item(prompt, result, _others(prompt, result, near))

    return _draw(rng, n, make)
