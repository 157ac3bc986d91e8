"""Embedded synthetic instruction sources, deterministic given a seed.

Four sources a user can mix (`data.sources`, `data.weights`): `math` (word problems with
worked answers), `identity` (about 1k paraphrased questions about the model, which is
called floe), `code` (small Python tasks) and `general` (templated instructions). Every
answer follows one fixed template per task so a tiny model learns it in tens of steps.
Each example is a record in the JSONL `messages` form, so it goes through exactly the
parser, chat template and packing that user data goes through.

Held-out questions. A fixed share (HELDOUT_SHARE) of each source's question space is kept
out of training for every seed: `generate(..., split="train")` never yields a record that
touches it, `generate(..., split="eval")` yields only records that do. What "touches" means
is `question_keys`: for `math` the arithmetic facts the answer states ("3+4", "12/3"; + and *
with sorted operands), so a held-out sum never appears in training in any wording; for the
other sources the text of each user turn (for `identity`, the exact paraphrase). The split
hashes only (source, key), not the seed, so `heldout_records` (for exact-match evaluation)
is held out from every run trained on the embedded mix.
"""
from __future__ import annotations

import hashlib
import math
import random
import re

SYSTEM_PROMPT = "You are floe, a helpful assistant."

_NAMES = ["Tom", "Ana", "Li", "Sara", "Omar", "Maya", "Ben", "Yuki", "Ivan", "Zoe", "Ravi", "Lea"]
_ITEMS = ["apples", "books", "pencils", "coins", "stamps", "marbles", "cookies", "cards", "shells"]


def _msgs(rng: random.Random, *turns: str) -> dict:
    """Alternate user/assistant turns, sometimes behind the system prompt."""
    messages = [{"role": "system", "content": SYSTEM_PROMPT}] if rng.random() < 0.2 else []
    for i, text in enumerate(turns):
        messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": text})
    return {"messages": messages}


# ----------------------------------------------------------------------------- math
def _math(rng: random.Random) -> dict:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    kind = rng.choice(["add", "sub", "mul", "div", "two_step", "bare"])
    if kind == "add":
        a, b = rng.randint(2, 60), rng.randint(2, 40)
        q = rng.choice([f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?",
                        f"{name} had {a} {item}. A friend gave {name} {b} more. How many {item} does {name} have?"])
        ans = f"{name} starts with {a} {item} and gets {b} more.\n{a} + {b} = {a + b}\nThe answer is {a + b}."
    elif kind == "sub":
        a = rng.randint(10, 90)
        b = rng.randint(1, a - 1)
        q = rng.choice([f"{name} has {a} {item} and gives away {b}. How many {item} are left?",
                        f"{name} had {a} {item} and lost {b} of them. How many {item} does {name} have left?"])
        ans = f"{name} starts with {a} {item} and loses {b}.\n{a} - {b} = {a - b}\nThe answer is {a - b}."
    elif kind == "mul":
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        q = f"{name} has {a} boxes with {b} {item} in each box. How many {item} are there in total?"
        ans = f"There are {a} boxes of {b} {item}.\n{a} * {b} = {a * b}\nThe answer is {a * b}."
    elif kind == "div":
        b, c = rng.randint(2, 9), rng.randint(2, 12)
        a = b * c
        q = f"{name} shares {a} {item} equally among {b} friends. How many {item} does each friend get?"
        ans = f"{a} {item} are shared by {b} friends.\n{a} / {b} = {c}\nThe answer is {c}."
    elif kind == "two_step":
        a, b, c = rng.randint(5, 40), rng.randint(2, 30), rng.randint(1, 5)
        q = (f"{name} has {a} {item}, buys {b} more and then gives {c} to a friend. "
             f"How many {item} does {name} have?")
        ans = (f"First {a} + {b} = {a + b}.\nThen {a + b} - {c} = {a + b - c}.\n"
               f"The answer is {a + b - c}.")
    else:
        op = rng.choice(["+", "-", "*"])
        # products stay in the times table (as in "mul"): a two-digit by two-digit product is not
        # learnable by a small model from examples, so a held-out one only measured memorisation
        a, b = (rng.randint(2, 12), rng.randint(2, 12)) if op == "*" else (rng.randint(0, 99), rng.randint(0, 99))
        value = {"+": a + b, "-": a - b, "*": a * b}[op]
        q = rng.choice([f"What is {a} {op} {b}?", f"Compute {a} {op} {b}.", f"Calculate {a} {op} {b}."])
        ans = f"{a} {op} {b} = {value}\nThe answer is {value}."
    return _msgs(rng, q, ans)


# ------------------------------------------------------------------------- identity
_IDENTITY = {
    "name": (["what is your name", "what's your name", "who are you", "what should I call you",
              "tell me your name", "what are you called", "do you have a name", "introduce yourself",
              "what do people call you", "can you tell me who you are"],
             "I am floe, a small Mixture-of-Experts language model."),
    "maker": (["who made you", "who created you", "who built you", "who trained you",
               "where do you come from", "which team developed you", "how were you made"],
              "I was trained with floe, an open framework for Arctic-style Mixture-of-Experts models."),
    "arch": (["what kind of model are you", "how do you work", "what is your architecture",
              "are you a transformer", "what is inside you", "are you a mixture of experts"],
             "I am a dense-residual Mixture-of-Experts transformer: each layer has a dense MLP "
             "plus experts, and a router sends every token to its top 2 experts."),
    "abilities": (["what can you do", "how can you help me", "what are you good at",
                   "what tasks can you do", "what do you know"],
                  "I can answer simple questions, solve small math word problems, write short "
                  "Python functions and follow simple instructions."),
    "human": (["are you a human", "are you a person", "are you alive", "are you a real person"],
              "No, I am floe, a language model. I am a program, not a person."),
    "limits": (["are you always right", "can you make mistakes", "should I trust you",
                "are your answers correct"],
               "I am a very small model, so I can make mistakes. Please check important answers."),
}
_PREFIXES = ["", "Hi! ", "Hello, ", "Hey, ", "Quick question: ", "Excuse me, ", "Please tell me, ", "So, ",
             "Hi there, ", "I was wondering, "]
_SUFFIXES = ["?", "?", " please?", " by the way?"]


def identity_questions() -> list[tuple[str, str]]:
    """Every (question, intent) paraphrase of the identity source, in a fixed order."""
    out = []
    for intent, (questions, _) in _IDENTITY.items():
        for q in questions:
            for p in _PREFIXES:
                for s in _SUFFIXES[1:]:  # "?" listed twice only to weight sampling
                    text = q[0].upper() + q[1:] if not p else q
                    if q.startswith(("tell me", "introduce", "can you tell")) and s != "?":
                        continue
                    out.append((f"{p}{text}{s}", intent))
    return out


_IDENTITY_QUESTIONS = identity_questions()


def _identity(rng: random.Random) -> dict:
    question, intent = rng.choice(_IDENTITY_QUESTIONS)
    answer = _IDENTITY[intent][1]
    if rng.random() < 0.15:  # a two-turn conversation: both answers are trained
        other = rng.choice([k for k in _IDENTITY if k != intent])
        follow = rng.choice(_IDENTITY[other][0])
        return _msgs(rng, question, answer, f"And {follow}?", _IDENTITY[other][1])
    return _msgs(rng, question, answer)


# ----------------------------------------------------------------------------- code
# (description, argument names, body lines, example call args, expected result function)
_CODE = {
    "add": ("adds two numbers", "a, b", ["return a + b"], lambda a, b: a + b),
    "subtract": ("subtracts b from a", "a, b", ["return a - b"], lambda a, b: a - b),
    "multiply": ("multiplies two numbers", "a, b", ["return a * b"], lambda a, b: a * b),
    "larger": ("returns the larger of two numbers", "a, b", ["return a if a > b else b"], max),
    "smaller": ("returns the smaller of two numbers", "a, b", ["return a if a < b else b"], min),
    "square": ("returns the square of a number", "x", ["return x * x"], lambda x: x * x),
    "is_even": ("checks whether a number is even", "n", ["return n % 2 == 0"], lambda n: n % 2 == 0),
    "double": ("doubles a number", "x", ["return 2 * x"], lambda x: 2 * x),
    "total": ("sums a list of numbers", "xs", ["result = 0", "for x in xs:", "    result += x", "return result"],
              lambda xs: sum(xs)),
    "count_even": ("counts the even numbers in a list", "xs",
                   ["count = 0", "for x in xs:", "    if x % 2 == 0:", "        count += 1", "return count"],
                   lambda xs: sum(1 for x in xs if x % 2 == 0)),
    "factorial": ("computes the factorial of n", "n",
                  ["result = 1", "for i in range(2, n + 1):", "    result *= i", "return result"],
                  math.factorial),
    "reverse": ("reverses a string", "s", ["return s[::-1]"], lambda s: s[::-1]),
    "shout": ("returns a string in upper case", "s", ["return s.upper()"], lambda s: s.upper()),
}
_WORDS = ["cat", "river", "moon", "apple", "green", "house", "expert", "router", "token", "cloud"]


def _code_args(names: str, rng: random.Random) -> list:
    if names == "xs":
        return [[rng.randint(0, 9) for _ in range(rng.randint(2, 5))]]
    if names == "s":
        return [rng.choice(_WORDS)]
    return [rng.randint(0, 12) for _ in names.split(", ")]


def _code(rng: random.Random) -> dict:
    fname = rng.choice(sorted(_CODE))
    desc, params, body, fn = _CODE[fname]
    source = "\n".join([f"def {fname}({params}):"] + ["    " + line for line in body])
    kind = rng.random()
    if kind < 0.5:
        q = rng.choice([f"Write a Python function `{fname}` that {desc}.",
                        f"Write a Python function named {fname} that {desc}."])
        a = f"```python\n{source}\n```"
        if rng.random() < 0.3:
            args = _code_args(params, rng)
            call = f"{fname}({', '.join(repr(x) for x in args)})"
            return _msgs(rng, q, a, f"What does `{call}` return?", f"`{call}` returns {fn(*args)!r}.")
        return _msgs(rng, q, a)
    if kind < 0.8:
        args = _code_args(params, rng)
        call = f"{fname}({', '.join(repr(x) for x in args)})"
        q = f"What does this Python code print?\n```python\n{source}\n\nprint({call})\n```"
        return _msgs(rng, q, f"It prints {fn(*args)}.")
    q = f"Explain what this Python function does.\n```python\n{source}\n```"
    return _msgs(rng, q, f"The function `{fname}` {desc}.")


# -------------------------------------------------------------------------- general
_CAPITALS = {"France": "Paris", "Spain": "Madrid", "Italy": "Rome", "Germany": "Berlin",
             "Japan": "Tokyo", "Canada": "Ottawa", "Egypt": "Cairo", "Peru": "Lima",
             "Norway": "Oslo", "Kenya": "Nairobi", "India": "New Delhi", "Chile": "Santiago",
             "Poland": "Warsaw", "Greece": "Athens", "Ireland": "Dublin", "Portugal": "Lisbon"}
_OPPOSITES = {"hot": "cold", "big": "small", "fast": "slow", "happy": "sad", "light": "dark",
              "up": "down", "open": "closed", "early": "late", "full": "empty", "hard": "soft",
              "old": "new", "wet": "dry", "loud": "quiet", "strong": "weak"}
_DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
_LISTS = {"colors": "red, green and blue", "fruits": "apple, banana and orange",
          "animals": "cat, dog and horse", "planets": "Mercury, Venus and Earth",
          "shapes": "circle, square and triangle", "seasons": "spring, summer and autumn"}


def _general(rng: random.Random) -> dict:
    kind = rng.choice(["capital", "opposite", "reverse", "sort", "upper", "letters", "day",
                       "units", "list", "spell"])
    if kind == "capital":
        country = rng.choice(sorted(_CAPITALS))
        q, a = f"What is the capital of {country}?", f"The capital of {country} is {_CAPITALS[country]}."
        if rng.random() < 0.3:
            other = rng.choice(sorted(_CAPITALS))
            return _msgs(rng, q, a, f"And of {other}?", f"The capital of {other} is {_CAPITALS[other]}.")
        return _msgs(rng, q, a)
    if kind == "opposite":
        word = rng.choice(sorted(_OPPOSITES))
        return _msgs(rng, f"What is the opposite of \"{word}\"?",
                     f"The opposite of \"{word}\" is \"{_OPPOSITES[word]}\".")
    if kind == "reverse":
        word = rng.choice(_WORDS + sorted(_OPPOSITES))
        return _msgs(rng, f"Reverse the word \"{word}\".", f"\"{word}\" reversed is \"{word[::-1]}\".")
    if kind == "sort":
        xs = [rng.randint(0, 99) for _ in range(rng.randint(3, 6))]
        order = rng.choice(["smallest to largest", "largest to smallest"])
        ys = sorted(xs, reverse=order.startswith("largest"))
        return _msgs(rng, f"Sort these numbers from {order}: {', '.join(map(str, xs))}.",
                     ", ".join(map(str, ys)))
    if kind == "upper":
        phrase = " ".join(rng.sample(_WORDS, rng.randint(1, 3)))
        return _msgs(rng, f"Write \"{phrase}\" in capital letters.", phrase.upper())
    if kind == "letters":
        word = rng.choice(_WORDS + sorted(_CAPITALS))
        return _msgs(rng, f"How many letters are in the word \"{word}\"?",
                     f"The word \"{word}\" has {len(word)} letters.")
    if kind == "day":
        i = rng.randrange(7)
        return _msgs(rng, f"What day comes after {_DAYS[i]}?", f"{_DAYS[(i + 1) % 7]} comes after {_DAYS[i]}.")
    if kind == "units":
        n = rng.randint(1, 20)
        unit, big, small, factor = rng.choice([("km", "kilometers", "meters", 1000),
                                                ("h", "hours", "minutes", 60),
                                                ("kg", "kilograms", "grams", 1000)])
        return _msgs(rng, f"How many {small} are in {n} {big}?",
                     f"{n} {big} is {n} * {factor} = {n * factor} {small}.")
    if kind == "list":
        category = rng.choice(sorted(_LISTS))
        return _msgs(rng, f"Name three {category}.", f"Three {category}: {_LISTS[category]}.")
    word = rng.choice(_WORDS)
    return _msgs(rng, f"Spell \"{word}\" letter by letter.", "-".join(word))


SOURCES = {"math": _math, "identity": _identity, "code": _code, "general": _general}
SPLITS = ("train", "eval", "all")
HELDOUT_SHARE = 0.1  # share of each source's question keys kept out of training (fixed, seed-free)
_FACT = re.compile(r"(\d+) ([-+*/]) (\d+) = ")  # how every math answer states its arithmetic


def question_keys(source: str, record: dict) -> list[str]:
    """What identifies the question(s) of an embedded record for the held-out split (see module doc)."""
    turns = record["messages"]
    if source == "math":
        keys = []
        for t in turns:
            if t["role"] == "assistant":
                for a, op, b in _FACT.findall(t["content"]):
                    if op in "+*":  # commutative: 3+4 and 4+3 are one fact
                        a, b = sorted((a, b), key=int)
                    keys.append(f"{a}{op}{b}")
        assert keys, record  # every math answer states at least one fact
        return keys
    return [t["content"] for t in turns if t["role"] == "user"]


def is_heldout_key(source: str, key: str) -> bool:
    """True when `key` lies in the held-out share of `source` (a fixed hash, the same for every seed)."""
    h = hashlib.sha256(f"floe-heldout\0{source}\0{key}".encode()).digest()
    return int.from_bytes(h[:8], "big") < HELDOUT_SHARE * 2.0 ** 64


def is_heldout(source: str, record: dict) -> bool:
    """True when the record touches a held-out question (it then belongs to the eval split only)."""
    return any(is_heldout_key(source, k) for k in question_keys(source, record))


def generate(source: str, num_examples: int, seed: int, split: str = "train") -> list[dict]:
    """`num_examples` records of an embedded source on one side of the held-out split.

    The same for the same (source, seed, split). "train" records never touch a held-out
    question; "eval" records always do (drawn from a seeded stream of their own); "all" is the
    unfiltered train stream, for tools/train_tokenizer.py only (the shipped tokenizer's recipe).
    """
    if source not in SOURCES:
        raise ValueError(f"unknown embedded source {source!r}; known: {sorted(SOURCES)}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    want_heldout = split == "eval"
    # str seeds hash the same on every platform; the eval stream is separate from the train one
    rng = random.Random(f"floe:{source}:heldout:{seed}" if split == "eval" else f"floe:{source}:{seed}")
    out, draws = [], 0
    while len(out) < num_examples:
        record = SOURCES[source](rng)
        draws += 1
        if split == "all" or is_heldout(source, record) == want_heldout:
            out.append(record)
        assert draws < 1000 * (num_examples + 10), f"{source}: the {split} side is (nearly) empty"
    return out


def heldout_records(num_per_source: int, seed: int = 0, sources: list[str] | None = None) -> list[dict]:
    """Held-out single-question records for exact-match evaluation, `num_per_source` per source.

    Each is {"source": name, "prompt": the user question, "completion": the reference answer},
    a valid floe prompt/completion record (so it can be written to JSONL and read back by
    data.eval_paths or tools/evaluate.py --data); no prompt is ever in a training record of the
    embedded mix, whatever its seed. Multi-turn draws are passed over; system prompts dropped.
    """
    out = []
    for source in sources or list(SOURCES):
        if source not in SOURCES:
            raise ValueError(f"unknown embedded source {source!r}; known: {sorted(SOURCES)}")
        rng = random.Random(f"floe:{source}:exact-match:{seed}")
        picked, draws = [], 0
        while len(picked) < num_per_source:
            record = SOURCES[source](rng)
            draws += 1
            turns = [t for t in record["messages"] if t["role"] != "system"]
            if len(turns) == 2 and is_heldout(source, record):
                picked.append({"source": source, "prompt": turns[0]["content"], "completion": turns[1]["content"]})
            assert draws < 1000 * (num_per_source + 10), f"{source}: no single-question held-out records"
        out.extend(picked)
    return out
