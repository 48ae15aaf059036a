"""A checkable instruction task the project generates itself: reverse a random 3-5 letter word.

Used by the post-training pipeline (experiments/pipeline/) and the tests: instructions with
exact answers, held-out prompts, and preference pairs of a correct answer against a wrong one
(another answer the model gave, or a near miss: two letters swapped)."""
from __future__ import annotations

import json
import random
from pathlib import Path

LETTERS = "abcdefghijklmnopqrstuvwxyz"


def prompt(word: str) -> str:
    return f"Reverse: {word}\nAnswer: "


def answer(word: str) -> str:
    return word[::-1]


def words(n: int, seed: int, min_len: int = 3, max_len: int = 5) -> list[str]:
    rng = random.Random(seed)
    out, seen = [], set()
    while len(out) < n:
        w = "".join(rng.choice(LETTERS) for _ in range(rng.randint(min_len, max_len)))
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


def near_miss(text: str, rng: random.Random) -> str:
    """A wrong answer close to the right one: two positions swapped, or a letter changed."""
    chars = list(text)
    i, j = rng.sample(range(len(chars)), 2)
    if chars[i] != chars[j]:
        chars[i], chars[j] = chars[j], chars[i]
    else:
        chars[i] = LETTERS[(LETTERS.index(chars[i]) + 1) % 26]
    return "".join(chars)


def split(n_train: int, n_test: int, seed: int = 0) -> tuple[list[str], list[str]]:
    ws = words(n_train + n_test, seed)
    return ws[:n_train], ws[n_train:]


def write_jsonl(path: str | Path, rows) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path


def instruct_rows(ws: list[str]) -> list[dict]:
    return [{"prompt": prompt(w), "completion": answer(w)} for w in ws]


def preference_rows(ws: list[str], wrong: dict[str, str] | None = None, seed: int = 0):
    """Correct answer vs `wrong[word]` when given (e.g. the policy's own mistake), else a near miss."""
    rng = random.Random(seed)
    rows = []
    for w in ws:
        bad = (wrong or {}).get(w) or near_miss(answer(w), rng)
        if bad == answer(w):
            bad = near_miss(answer(w), rng)
        rows.append({"prompt": prompt(w), "chosen": answer(w), "rejected": bad})
    return rows
