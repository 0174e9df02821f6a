"""The zoo's skills: deterministic generators of prompt/answer examples with multiple-choice distractors.

Every skill maps a seeded ``random.Random`` to one :class:`Example`. The example space of each
skill is split by a stable hash of the prompt into a *training* part and an *evaluation* part
(:func:`is_eval_prompt`), so evaluation data can never appear in training, whatever the seeds.
"""

from __future__ import annotations

import random
import string
import zlib
from collections.abc import Callable
from dataclasses import dataclass

LETTERS = string.ascii_lowercase
# One prompt in EVAL_BUCKETS/HASH_BUCKETS is reserved for evaluation (search + report splits).
HASH_BUCKETS = 8
EVAL_BUCKETS = 1


@dataclass(frozen=True)
class Example:
    """One task instance: ``prompt + answer + "\\n"`` is the training text; ``choices[label] == answer``."""

    skill: str
    prompt: str
    answer: str
    choices: tuple[str, ...]
    label: int


def is_eval_prompt(prompt: str) -> bool:
    """True if ``prompt`` belongs to the evaluation part of the example space (never trained on)."""
    return zlib.crc32(prompt.encode()) % HASH_BUCKETS < EVAL_BUCKETS


def _with_choices(skill: str, prompt: str, answer: str, wrong: list[str], rng: random.Random) -> Example:
    """Pick 3 distinct distractors from ``wrong`` and shuffle them with the answer."""
    pool = list(dict.fromkeys(w for w in wrong if w != answer))
    distractors = rng.sample(pool, 3)
    choices = [answer, *distractors]
    rng.shuffle(choices)
    return Example(skill, prompt, answer, tuple(choices), choices.index(answer))


def _add(rng: random.Random, top: int = 99) -> Example:
    a, b = rng.randint(10, top), rng.randint(10, top)
    s = a + b
    wrong = [str(s + d) for d in (1, -1, 10, -10, 2, -2, 11, -11, 9, -9)]
    return _with_choices("add", f"add {a}+{b}=", str(s), wrong, rng)


def _sort(rng: random.Random, letters: str = LETTERS) -> Example:
    n = rng.randint(5, 8)
    word = "".join(rng.sample(letters, n))
    ans = "".join(sorted(word))
    wrong = []
    for i in range(n - 1):  # one adjacent swap of the sorted answer
        w = list(ans)
        w[i], w[i + 1] = w[i + 1], w[i]
        wrong.append("".join(w))
    return _with_choices("sort", f"srt {word}=", ans, wrong, rng)


def _shift(rng: random.Random, letters: str = LETTERS[:25]) -> Example:
    n = rng.randint(4, 7)
    word = "".join(rng.choice(letters) for _ in range(n))
    ans = "".join(chr(ord(c) + 1) for c in word)
    wrong = []
    for i in range(n):  # one letter shifted by 0 or 2 instead of 1
        for d in (0, 2):
            wrong.append(ans[:i] + chr(ord(word[i]) + d) + ans[i + 1:])
    return _with_choices("shift", f"shf {word}=", ans, wrong, rng)


def _copy(rng: random.Random) -> Example:
    n = rng.randint(3, 8)
    word = "".join(rng.choice(LETTERS + string.digits) for _ in range(n))
    return Example("copy", f"cpy {word}=", word, (word,), 0)


# ``<skill>_part``: the same task on part of its input space only (tens digits 1-5; letters a-p).
# The base learns these, so it is partly competent at the full skill; experts learn the full one.
GENERATORS: dict[str, Callable[[random.Random], Example]] = {
    "add": _add, "sort": _sort, "shift": _shift, "copy": _copy,
    "add_part": lambda rng: _add(rng, top=59),
    "sort_part": lambda rng: _sort(rng, LETTERS[:16]),
    "shift_part": lambda rng: _shift(rng, LETTERS[:16]),
}


def sample(skill: str, rng: random.Random, split: str) -> Example:
    """Draw one example of ``skill`` from the ``train`` or ``eval`` part of its example space."""
    gen = GENERATORS[skill]
    want_eval = split == "eval"
    while True:
        ex = gen(rng)
        if is_eval_prompt(ex.prompt) == want_eval:
            return ex
