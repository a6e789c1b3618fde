"""Write `fleetlm_mc.jsonl`, the local multiple-choice task of the accuracy benchmark.

Nothing may be downloaded here, so the questions are built from small tables of facts that a
135M-parameter model half knows (capitals, languages, opposites, plurals, arithmetic, ...):
easy enough that the model beats chance by a wide margin, so that a weight or KV-cache
variant that loses precision shows up as lost answers. Four choices each; the distractors come
from the same table. Deterministic (seeded); the committed file is what `fleetlm_mc.yaml` reads.

    .venv/bin/python benchmarks/accuracy/make_task.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).with_name("fleetlm_mc.jsonl")
SEED = 12
NUM_CHOICES = 4

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Spain": "Madrid", "Italy": "Rome",
    "Japan": "Tokyo", "China": "Beijing", "Russia": "Moscow", "Egypt": "Cairo",
    "the United Kingdom": "London", "Portugal": "Lisbon", "Greece": "Athens",
    "Austria": "Vienna", "Poland": "Warsaw", "Norway": "Oslo", "Sweden": "Stockholm",
    "Finland": "Helsinki", "Denmark": "Copenhagen", "Ireland": "Dublin", "Canada": "Ottawa",
    "Australia": "Canberra", "India": "New Delhi", "South Korea": "Seoul", "Kenya": "Nairobi",
    "Argentina": "Buenos Aires", "Peru": "Lima", "Mexico": "Mexico City", "Cuba": "Havana",
    "Thailand": "Bangkok", "Turkey": "Ankara", "Hungary": "Budapest", "Belgium": "Brussels",
    "the Netherlands": "Amsterdam", "Czechia": "Prague", "Iran": "Tehran", "Iraq": "Baghdad",
    "Chile": "Santiago", "Colombia": "Bogota", "Vietnam": "Hanoi", "Ukraine": "Kyiv",
    "the United States": "Washington",
}
LANGUAGES = {
    "France": "French", "Germany": "German", "Spain": "Spanish", "Italy": "Italian",
    "Japan": "Japanese", "China": "Chinese", "Russia": "Russian", "Portugal": "Portuguese",
    "Greece": "Greek", "Poland": "Polish", "Sweden": "Swedish", "Turkey": "Turkish",
    "Finland": "Finnish", "the Netherlands": "Dutch", "Korea": "Korean", "Brazil": "Portuguese",
    "Mexico": "Spanish", "England": "English", "Hungary": "Hungarian", "Norway": "Norwegian",
}
OPPOSITES = {
    "hot": "cold", "big": "small", "up": "down", "day": "night", "fast": "slow",
    "happy": "sad", "old": "young", "open": "closed", "light": "dark", "tall": "short",
    "full": "empty", "hard": "soft", "rich": "poor", "early": "late", "wet": "dry",
    "strong": "weak", "thick": "thin", "loud": "quiet", "clean": "dirty",
    "win": "lose", "buy": "sell", "push": "pull", "first": "last", "inside": "outside",
    "north": "south", "east": "west", "left": "right", "top": "bottom", "true": "false",
}
PLURALS = {
    "mouse": "mice", "child": "children", "foot": "feet", "tooth": "teeth", "man": "men",
    "woman": "women", "goose": "geese", "person": "people", "cat": "cats", "box": "boxes",
    "city": "cities", "knife": "knives", "leaf": "leaves", "baby": "babies", "bus": "buses",
    "wolf": "wolves", "dog": "dogs", "house": "houses", "ox": "oxen", "potato": "potatoes",
}
YOUNG = {
    "cat": "kitten", "dog": "puppy", "cow": "calf", "sheep": "lamb", "horse": "foal",
    "duck": "duckling", "frog": "tadpole", "goat": "kid", "bear": "cub", "pig": "piglet",
    "chicken": "chick", "kangaroo": "joey", "swan": "cygnet", "deer": "fawn",
}
COLOURS = {
    "grass": "green", "the sky on a clear day": "blue", "snow": "white", "coal": "black",
    "a ripe banana": "yellow", "blood": "red", "a carrot": "orange", "milk": "white",
    "a lemon": "yellow", "a strawberry": "red", "chocolate": "brown", "the sea": "blue",
}
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December"]


def question(text: str, answer: str, pool: list[str], rng: random.Random) -> dict:
    distractors = rng.sample(sorted(set(pool) - {answer}), NUM_CHOICES - 1)
    choices = [answer, *distractors]
    rng.shuffle(choices)
    return {"question": f"Question: {text}\nAnswer:", "choices": choices,
            "answer": choices.index(answer)}


def arithmetic(rng: random.Random) -> dict:
    a, b = rng.randint(2, 30), rng.randint(2, 30)
    op = rng.choice("+-x")
    if op == "-" and b > a:
        a, b = b, a
    value = a + b if op == "+" else a - b if op == "-" else a * b
    near = sorted({value + d for d in (-10, -2, -1, 1, 2, 10)} - {value})
    return question(f"What is {a} {op} {b}?", str(value), [str(v) for v in near], rng)


def make_items() -> list[dict]:
    rng = random.Random(SEED)
    items = []
    for country, city in CAPITALS.items():
        items.append(question(f"What is the capital of {country}?", city,
                              list(CAPITALS.values()), rng))
    for country, language in LANGUAGES.items():
        items.append(question(f"Which language do most people in {country} speak?", language,
                              list(LANGUAGES.values()), rng))
    for word, opposite in OPPOSITES.items():
        items.append(question(f"What is the opposite of \"{word}\"?", opposite,
                              [w for pair in OPPOSITES.items() for w in pair if w != word], rng))
    for word, plural in PLURALS.items():
        items.append(question(f"What is the plural of \"{word}\"?", plural,
                              list(PLURALS.values()) + [word + "s", word + "es"], rng))
    for animal, young in YOUNG.items():
        items.append(question(f"What is a young {animal} called?", young, list(YOUNG.values()),
                              rng))
    for thing, colour in COLOURS.items():
        items.append(question(f"What colour is {thing}?", colour, sorted(set(COLOURS.values())),
                              rng))
    for i, day in enumerate(DAYS):
        items.append(question(f"Which day comes after {day}?", DAYS[(i + 1) % 7], DAYS, rng))
    for i, month in enumerate(MONTHS):
        items.append(question(f"Which month comes after {month}?", MONTHS[(i + 1) % 12], MONTHS,
                              rng))
    items += [arithmetic(rng) for _ in range(60)]
    return items


def main() -> None:
    items = make_items()
    OUT.write_text("".join(json.dumps(item) + "\n" for item in items))
    print(f"{len(items)} questions in {OUT}")


if __name__ == "__main__":
    main()
