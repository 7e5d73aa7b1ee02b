"""Write the examples of the local downstream tasks (parscale_jax/tasks/*.jsonl), deterministically.

    python scripts/make_tasks.py   # rewrites shakespeare_mc, shakespeare_cloze, facts_qa, facts_gen (.jsonl)

- shakespeare_mc: 100 speeches of the default config's held-out plays (data.eval_fraction,
  data.seed: text no default run trains on). The context is the speaker's name and the speech's
  first two lines; the choices are its true third line and three lines of other speeches (at least
  20 characters each, no stage directions), in a seeded order.
- shakespeare_cloze: the same speeches, the context running on into the third line and stopping
  inside a word; the choices are the rest of that line and as many characters of three lines of
  other speeches, from inside a word as well. Finishing a word is a cue even a small byte-level model
  learns, so the task separates a trained toy model from an untrained one (shakespeare_mc does not).
- facts_qa / facts_gen: the facts below, a prompt whose true completion a small pretrained English
  model knows, and three wrong completions of the same kind.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from parscale_jax.config import load_config
from parscale_jax.data.corpus import corpus_documents, split_documents

OUT = Path(__file__).resolve().parent.parent / "parscale_jax" / "tasks"
SEED = 0
ITEMS = 100

# (prompt, the true completion, three wrong ones)
FACTS = [
    ("The capital of France is", "Paris", ["Berlin", "Madrid", "Rome"]),
    ("The capital of Germany is", "Berlin", ["Paris", "Vienna", "Warsaw"]),
    ("The capital of Italy is", "Rome", ["Madrid", "Athens", "Lisbon"]),
    ("The capital of Spain is", "Madrid", ["Lisbon", "Rome", "Paris"]),
    ("The capital of Japan is", "Tokyo", ["Beijing", "Seoul", "Bangkok"]),
    ("The capital of the United Kingdom is", "London", ["Dublin", "Paris", "Oslo"]),
    ("The capital of Russia is", "Moscow", ["Warsaw", "Minsk", "Prague"]),
    ("The capital of China is", "Beijing", ["Tokyo", "Seoul", "Hanoi"]),
    ("The capital of Egypt is", "Cairo", ["Nairobi", "Tunis", "Baghdad"]),
    ("The capital of Greece is", "Athens", ["Rome", "Sofia", "Ankara"]),
    ("The Eiffel Tower is in", "Paris", ["London", "Rome", "Berlin"]),
    ("The Great Wall is in", "China", ["Egypt", "Brazil", "Canada"]),
    ("The Statue of Liberty is in New", "York", ["Delhi", "Zealand", "Mexico"]),
    ("Water is made of hydrogen and", "oxygen", ["gold", "iron", "sand"]),
    ("The largest planet in the solar system is", "Jupiter", ["Mercury", "Mars", "Venus"]),
    ("The planet closest to the Sun is", "Mercury", ["Jupiter", "Neptune", "Saturn"]),
    ("The Earth revolves around the", "Sun", ["Moon", "Mars", "Jupiter"]),
    ("A week has seven", "days", ["hours", "years", "minutes"]),
    ("A year has twelve", "months", ["days", "hours", "minutes"]),
    ("The opposite of hot is", "cold", ["red", "tall", "fast"]),
    ("On a clear day the sky is", "blue", ["green", "red", "brown"]),
    ("The color of grass is", "green", ["blue", "red", "purple"]),
    ("Bees make", "honey", ["milk", "bread", "steel"]),
    ("The boiling point of water in degrees Celsius is", "100", ["0", "50", "37"]),
    ("The chemical symbol for gold is", "Au", ["Ag", "Fe", "Cu"]),
    ("Romeo and Juliet was written by William", "Shakespeare", ["Wordsworth", "Blake", "Golding"]),
    ("The first President of the United States was George", "Washington", ["Lincoln", "Jefferson", "Adams"]),
    ("The largest ocean on Earth is the", "Pacific", ["Atlantic", "Indian", "Arctic"]),
    ("The tallest mountain in the world is Mount", "Everest", ["Kilimanjaro", "Fuji", "Olympus"]),
    ("The longest river in Africa is the", "Nile", ["Amazon", "Danube", "Thames"]),
    ("The currency of Japan is the", "yen", ["euro", "peso", "rupee"]),
    ("Two plus two equals", "four", ["five", "three", "seven"]),
    ("A spider has eight", "legs", ["wings", "heads", "tails"]),
    ("Ice is frozen", "water", ["milk", "fire", "sand"]),
    ("The Sun rises in the", "east", ["west", "north", "south"]),
    ("A baby cat is called a", "kitten", ["puppy", "calf", "foal"]),
    ("A baby dog is called a", "puppy", ["kitten", "calf", "lamb"]),
    ("The main language spoken in Brazil is", "Portuguese", ["Chinese", "Russian", "Arabic"]),
    ("The speed of light is about 300,000 kilometers per", "second", ["year", "month", "week"]),
    ("The heart pumps", "blood", ["sand", "air", "milk"]),
    ("Christmas Day is on the 25th of", "December", ["July", "March", "August"]),
    ("The chemical formula of water is", "H2O", ["CO2", "NaCl", "CH4"]),
]


def speeches(text: str) -> list[list[str]]:
    """Blocks of lines between blank lines whose first line is a speaker's name ("OLIVER.")."""
    blocks = [block.splitlines() for block in text.split("\n\n")]
    return [block for block in blocks if len(block) >= 4 and block[0].isupper() and block[0].endswith(".")]


def good(line: str) -> bool:
    return len(line.strip()) >= 20 and not line.lstrip().startswith("[")


def shakespeare_items() -> list[dict]:
    data = load_config().data
    _, held_out = split_documents(corpus_documents(data), data.eval_fraction, data.seed)
    blocks = [block for doc in held_out for block in speeches(doc)]
    usable = [block for block in blocks if all(good(line) for line in block[1:4])]
    lines = [line for block in blocks for line in block[1:] if good(line)]
    rng = random.Random(SEED)
    chosen = sorted(rng.sample(range(len(usable)), ITEMS))
    items = []
    for index in chosen:
        block = usable[index]
        target = block[3]
        wrong: list[str] = []
        while len(wrong) < 3:
            line = rng.choice(lines)
            if line not in block and line not in wrong:
                wrong.append(line)
        choices = wrong + [target]
        rng.shuffle(choices)
        items.append({"context": "\n".join(block[:3]) + "\n", "choices": choices, "answer": choices.index(target)})
    return items


def cut_inside_a_word(line: str, rng: random.Random) -> int:
    """A position inside one of the line's words, after at least its first letter (from the 6th character)."""
    inside = [i for i in range(6, len(line) - 4) if line[i - 1].isalpha() and line[i].isalpha()]
    return rng.choice(inside) if inside else len(line) // 2


def shakespeare_cloze_items() -> list[dict]:
    items = []
    rng = random.Random(SEED + 1)
    others = [line for item in shakespeare_items() for line in item["choices"]]
    for item in shakespeare_items():
        target = item["choices"][item["answer"]]
        cut = cut_inside_a_word(target, rng)
        wrong: list[str] = []
        while len(wrong) < 3:  # as long as the true rest: the choices' lengths say nothing
            line = rng.choice(others)
            rest = line[cut_inside_a_word(line, rng):][:len(target) - cut]
            if line != target and len(rest) == len(target) - cut and rest not in wrong and rest != target[cut:]:
                wrong.append(rest)
        choices = wrong + [target[cut:]]
        rng.shuffle(choices)
        items.append({"context": item["context"] + target[:cut], "choices": choices,
                      "answer": choices.index(target[cut:])})
    return items


def fact_items() -> tuple[list[dict], list[dict]]:
    rng = random.Random(SEED)
    mc, gen = [], []
    for prompt, answer, wrong in FACTS:
        choices = [answer, *wrong]
        rng.shuffle(choices)
        mc.append({"question": prompt, "choices": choices, "answer": choices.index(answer)})
        gen.append({"question": prompt, "answer": answer})
    return mc, gen


def write(name: str, items: list[dict]) -> None:
    path = OUT / f"{name}.jsonl"
    path.write_text("".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items), encoding="utf-8")
    print(f"{path}: {len(items)} examples")


if __name__ == "__main__":
    write("shakespeare_mc", shakespeare_items())
    write("shakespeare_cloze", shakespeare_cloze_items())
    facts_mc, facts_gen = fact_items()
    write("facts_qa", facts_mc)
    write("facts_gen", facts_gen)
