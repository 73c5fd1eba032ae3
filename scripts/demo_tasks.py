"""Small reasoning tasks with worked steps: arithmetic, word problems, letters and lists.

Each task returns (question, reasoning, answer). The reasoning goes into the thought channel when thinking
is on; the answer is what the model says either way.
"""

from __future__ import annotations

import random

Task = tuple[str, str, str]

NAMES = ("Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jo", "Kofi", "Lena", "Mia",
         "Noah", "Omar", "Priya", "Quinn", "Ravi", "Sara", "Tom", "Uma", "Vic", "Wen", "Yara", "Zoe")  # fmt: skip
ITEMS = ("apples", "books", "coins", "stamps", "pencils", "marbles", "cookies", "cards", "shells", "stickers")


def _add_steps(a: int, b: int) -> str:
    lines, carry = [], 0
    da, db = str(a)[::-1], str(b)[::-1]
    for i in range(max(len(da), len(db))):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        total = x + y + carry
        line = f"{x} + {y}" + (f" + {carry}" if carry else "") + f" = {total}, write {total % 10}"
        carry = total // 10
        lines.append(line + (", carry 1" if carry else ""))
    if carry:
        lines.append("write the final carry 1")
    return "Add the digits from the right:\n" + "\n".join(lines) + f"\nSo {a} + {b} = {a + b}."


def _sub_steps(a: int, b: int) -> str:
    if a < b:
        return f"{b} is larger than {a}, so compute {b} - {a} and make it negative.\n" + _sub_steps(
            b, a
        ).replace(f"So {b} - {a} = {b - a}.", f"{b} - {a} = {b - a}, so {a} - {b} = {a - b}.")
    lines, borrow = [], 0
    da, db = str(a)[::-1], str(b)[::-1]
    for i in range(len(da)):
        x = int(da[i]) - borrow
        y = int(db[i]) if i < len(db) else 0
        if x < y:
            lines.append(f"{x} < {y}: borrow, {x + 10} - {y} = {x + 10 - y}")
            borrow = 1
        else:
            lines.append(f"{x} - {y} = {x - y}")
            borrow = 0
    return "Subtract the digits from the right:\n" + "\n".join(lines) + f"\nSo {a} - {b} = {a - b}."


def _mul_steps(a: int, b: int) -> str:
    if b >= 10:
        tens, ones = b - b % 10, b % 10
        return (
            f"Split {b} into {tens} + {ones}.\n{a} × {tens} = {a * tens}\n{a} × {ones} = {a * ones}\n"
            f"{a * tens} + {a * ones} = {a * b}\nSo {a} × {b} = {a * b}."
        )
    if a >= 10:
        tens, ones = a - a % 10, a % 10
        return (
            f"Split {a} into {tens} + {ones}.\n{tens} × {b} = {tens * b}\n{ones} × {b} = {ones * b}\n"
            f"{tens * b} + {ones * b} = {a * b}\nSo {a} × {b} = {a * b}."
        )
    return f"{a} × {b} = {a * b}."


def arithmetic(rng: random.Random) -> Task:
    op = rng.choice("+-x")
    if op == "+":
        a, b = rng.randint(1, 999), rng.randint(1, 999)
        q = rng.choice(("What is {a} + {b}?", "Calculate {a} + {b}.", "Add {a} and {b}.", "{a} + {b} = ?",
                        "What is the sum of {a} and {b}?"))  # fmt: skip
        return (
            q.format(a=a, b=b),
            _add_steps(a, b),
            rng.choice(("{a} + {b} = {c}.", "The answer is {c}.")).format(a=a, b=b, c=a + b),
        )
    if op == "-":
        a, b = rng.randint(1, 999), rng.randint(1, 999)
        q = rng.choice(
            ("What is {a} - {b}?", "Calculate {a} - {b}.", "Subtract {b} from {a}.", "{a} - {b} = ?")
        )
        return (
            q.format(a=a, b=b),
            _sub_steps(a, b),
            rng.choice(("{a} - {b} = {c}.", "The answer is {c}.")).format(a=a, b=b, c=a - b),
        )
    a = rng.randint(2, 99)
    b = rng.randint(2, 9) if rng.random() < 0.5 else rng.randint(11, 99)
    q = rng.choice(
        ("What is {a} × {b}?", "What is {a} * {b}?", "Multiply {a} by {b}.", "Calculate {a} times {b}.")
    )
    return (
        q.format(a=a, b=b),
        _mul_steps(a, b),
        rng.choice(("{a} × {b} = {c}.", "The answer is {c}.")).format(a=a, b=b, c=a * b),
    )


def word_problem(rng: random.Random) -> Task:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(2, 60), rng.randint(2, 40)
    kind = rng.randrange(3)
    if kind == 0:
        q = f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?"
        r = f"{name} starts with {a} {item} and gets {b} more, so add: {a} + {b} = {a + b}."
        return q, r, f"{name} has {a + b} {item} now."
    if kind == 1:
        a = a + b
        q = f"{name} had {a} {item} and gave away {b}. How many {item} are left?"
        r = f"{name} had {a} and gave away {b}, so subtract: {a} - {b} = {a - b}."
        return q, r, f"{name} has {a - b} {item} left."
    boxes, per = rng.randint(2, 9), rng.randint(2, 12)
    q = f"{name} has {boxes} boxes with {per} {item} in each box. How many {item} is that in total?"
    r = f"{boxes} boxes of {per} {item} each: {boxes} × {per} = {boxes * per}."
    return q, r, f"That is {boxes * per} {item} in total."


def _spell(word: str) -> str:
    return "-".join(word)


def letters(rng: random.Random, words: list[str]) -> Task:
    word = rng.choice(words)
    kind = rng.randrange(5)
    if kind == 0:
        q = rng.choice(
            ("Reverse the word '{w}'.", "What is '{w}' spelled backwards?", "Write '{w}' backwards.")
        )
        r = f"The letters of '{word}' are {_spell(word)}. Backwards they are {_spell(word[::-1])}."
        return q.format(w=word), r, f"'{word}' reversed is '{word[::-1]}'."
    if kind == 1:
        q = rng.choice(("How many letters are in '{w}'?", "How long is the word '{w}'?"))
        numbered = ", ".join(f"{i + 1} {c}" for i, c in enumerate(word))
        r = f"Count the letters of '{word}': {numbered}. That is {len(word)} letters."
        return q.format(w=word), r, f"'{word}' has {len(word)} letters."
    if kind == 2:
        letter = rng.choice(word) if rng.random() < 0.8 else rng.choice("aeioulnrst")
        count = word.count(letter)
        q = f"How many times does the letter '{letter}' appear in '{word}'?"
        hits = [str(i + 1) for i, c in enumerate(word) if c == letter]
        where = f"at positions {', '.join(hits)}" if hits else "nowhere"
        r = f"The letters of '{word}' are {_spell(word)}. '{letter}' appears {where}, so {count} times."
        return q, r, f"The letter '{letter}' appears {count} time{'s' if count != 1 else ''} in '{word}'."
    if kind == 3:
        q = rng.choice(("Write '{w}' in capital letters.", "Convert '{w}' to uppercase."))
        r = f"Make every letter of '{word}' a capital: {_spell(word.upper())}."
        return q.format(w=word), r, f"{word.upper()}"
    q = f"What is the first letter of '{word}', and the last?"
    r = f"'{word}' starts with '{word[0]}' and ends with '{word[-1]}'."
    return q, r, f"The first letter is '{word[0]}' and the last is '{word[-1]}'."


def numbers(rng: random.Random) -> Task:
    values = rng.sample(range(1, 100), rng.randint(3, 6))
    text = ", ".join(map(str, values))
    kind = rng.randrange(4)
    ordered = sorted(values)
    if kind == 0:
        q = f"Sort these numbers from smallest to largest: {text}."
        picks = []
        rest = list(values)
        for _ in range(len(values)):
            low = min(rest)
            rest.remove(low)
            picks.append(str(low))
        r = "Take the smallest remaining number each time: " + ", then ".join(picks) + "."
        return q, r, ", ".join(map(str, ordered))
    if kind == 1:
        q = f"Which is the largest number in this list: {text}?"
        r = (
            "Compare them one by one, keeping the largest so far: "
            + ", ".join(str(max(values[: i + 1])) for i in range(len(values)))
            + f". The largest is {ordered[-1]}."
        )
        return q, r, f"The largest number is {ordered[-1]}."
    if kind == 2:
        n = rng.choice(values)
        q = f"Is {n} even or odd?"
        r = f"{n} divided by 2 leaves remainder {n % 2}, so it is {'odd' if n % 2 else 'even'}."
        return q, r, f"{n} is {'odd' if n % 2 else 'even'}."
    a, b = values[:2]
    q = f"Which is bigger, {a} or {b}?"
    r = f"Compare {a} and {b}: {max(a, b)} is greater than {min(a, b)}."
    return q, r, f"{max(a, b)} is bigger."
