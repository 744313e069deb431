"""Teacher-free chat conversations for instruction tuning a small model that knows its scope.

A model trained in minutes on exercises can do arithmetic, word problems and small Python functions, and nothing
else. The conversations here teach it to say so: greetings, who it is, what it can do, a short honest refusal for
anything else, and multi-turn follow-ups that refer to the turn before ("and if she buys 3 more?"). Everything is
written procedurally from phrase lists, deterministic by seed, in OpenAI message shape.

`sft_mix(records, seed)` turns exercise records (see procedural.py) into the instruction-tuning set: each exercise
as a single-turn chat, code requests in natural words (and a few functions in everyday words), these conversations,
word problems of a single event, and follow-ups, in fixed shares.
"""
from __future__ import annotations

import random
from typing import Callable

from .procedural import NAMES, TRAIN_PHRASINGS, split_of, word_problem

IDENTITY = "a small phi-style model, trained from scratch in minutes by phikit's speedrun"
SKILLS = "arithmetic, word problems and small Python functions"
CONVERSATION_KINDS = ("greeting", "identity", "capabilities", "refusal", "follow_up", "code_request",
                      "one_event_problem", "everyday_code")


def _msgs(*turns: str) -> dict:
    roles = ("user", "assistant")
    return {"messages": [{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)]}


def _pick(rng: random.Random, *options: str) -> str:
    return rng.choice(options)


# --- who it is, what it can do, what it declines -------------------------------------------------------------

def _introduction(rng: random.Random) -> str:
    return _pick(rng, f"I'm {IDENTITY}.", f"I am {IDENTITY}.")


def _capabilities(rng: random.Random) -> str:
    return _pick(rng, f"I can do {SKILLS}.", f"I can help with {SKILLS}.",
                 f"Ask me about {SKILLS}.") + _pick(rng, "", " Anything else is beyond me.")


def greeting(rng: random.Random) -> dict:
    hello = _pick(rng, "Hello", "Hi", "Hey", "Hi there", "Hello there", "Good morning", "Good evening", "Greetings")
    user = hello + _pick(rng, "!", ".", "", "!!", ",") + _pick(
        rng, "", " How are you?", " What can you do?", " Who are you?", " Can you help me?", " Nice to meet you.")
    answer = _pick(rng, "Hello!", "Hi!", "Hello there!", "Hi, nice to meet you!") + " " + _introduction(rng) + " " + \
        _capabilities(rng)
    return _msgs(user, answer)


def identity(rng: random.Random) -> dict:
    user = _pick(rng, "Who are you?", "What are you?", "What is your name?", "Who made you?", "Who trained you?",
                 "Are you ChatGPT?", "Are you a human?", "What model are you?", "Tell me about yourself.",
                 "Are you a person or a program?", "How were you made?", "Introduce yourself.")
    answer = _introduction(rng)
    if user.startswith("Are you"):
        answer = "No. " + answer
    return _msgs(user, answer + " " + _capabilities(rng))


def capabilities(rng: random.Random) -> dict:
    user = _pick(rng, "What can you do?", "What can you help me with?", "What are you good at?",
                 "How can you help me?", "What kinds of questions can I ask you?", "What do you know?",
                 "Can you help me?", "What should I ask you?")
    return _msgs(user, _capabilities(rng) + _pick(rng, "", " For example: \"What is 8 * 6?\""))


TOPICS = ["the sea", "love", "autumn", "my cat", "space", "friendship", "the city", "rain", "music", "history"]
PLACES = ["Paris", "Tokyo", "Lagos", "Lima", "Oslo", "Cairo", "Delhi", "Sydney", "Toronto", "Berlin"]
OUT_OF_SCOPE: list[Callable[[random.Random], str]] = [
    lambda r: f"Write a poem about {r.choice(TOPICS)}.",
    lambda r: f"Tell me a joke about {r.choice(TOPICS)}.",
    lambda r: f"What is the capital of {r.choice(['France', 'Japan', 'Peru', 'Kenya', 'Canada', 'Egypt'])}?",
    lambda r: f"Translate \"{r.choice(['good night', 'thank you', 'where is the station'])}\" into "
              f"{r.choice(['French', 'Spanish', 'German', 'Hindi'])}.",
    lambda r: f"What's the weather like in {r.choice(PLACES)} today?",
    lambda r: f"Who won the {r.choice(['last World Cup', 'election', 'Nobel Prize in physics', 'game yesterday'])}?",
    lambda r: f"I have a {r.choice(['headache', 'fever', 'sore throat'])}. What medicine should I take?",
    lambda r: f"Write an essay about {r.choice(TOPICS)}.",
    lambda r: f"What do you think about {r.choice(TOPICS)}?",
    lambda r: f"Recommend a good {r.choice(['movie', 'book', 'restaurant', 'song', 'phone'])}.",
    lambda r: f"Explain how {r.choice(['vaccines', 'black holes', 'the stock market', 'photosynthesis'])} work.",
    lambda r: f"Plan a trip to {r.choice(PLACES)} for me.",
    lambda r: "Summarize today's news.",
    lambda r: f"Give me advice about {r.choice(['my job', 'my relationship', 'investing', 'my exams'])}.",
]


def refusal(rng: random.Random) -> dict:
    user = rng.choice(OUT_OF_SCOPE)(rng)
    # No refusal starts like the capabilities answer ("I can do ..."): one that did ("I can't do that well") was
    # what a tuned model gave "Hello! What can you do?".
    answer = _pick(rng, "Sorry, I can't help with that.", "I'm sorry, that is beyond what I can do.",
                   "Sorry, I would not do that well, so I'd rather not try.", "That's outside what I know, sorry.")
    because = _pick(rng, f" I only know {SKILLS}.", f" I was only trained on {SKILLS}.")
    return _msgs(user, answer + because)


# --- follow-ups that refer to the turn before ----------------------------------------------------------------

def one_event_problem(rng: random.Random) -> dict:
    """A word problem with a single event. The exercises always have 2-4, and a chat model tuned on those alone
    answers "Maya has 7 apples. Maya buys 5 more apples. How many ...?" with a second purchase it made up. Only
    the training side of the split: held-out word problems never have one event, but no held-out key may train."""
    while True:
        r = word_problem(rng, TRAIN_PHRASINGS, events=(1, 1))
        if split_of(r["key"]) == "train":
            return dict(r, kind="word_problem", solution=r["text"][len(r["prompt"]):].strip())


def word_problem_follow_up(rng: random.Random, record: dict) -> dict:
    """A word problem, its solution, then one more event asked as a follow-up and solved from the last count."""
    hero, item, count = record["hero"], record["item"], record["answer"]
    other = rng.choice(record.get("others") or [n for n in NAMES if n != hero])
    if rng.random() < 0.5 or count < 2:
        k = rng.randint(1, 12)
        event = rng.choice([f"{hero} buys {k} more {item}", f"{other} gives {hero} {k} more {item}",
                            f"{hero} finds {k} more {item}"])
        result, math = count + k, f"{count} + {k} = {count + k}"
    else:
        k = rng.randint(1, count - 1)
        event = rng.choice([f"{hero} loses {k} {item}", f"{hero} gives {k} {item} to {other}",
                            f"{hero} gives away {k} {item}"])
        result, math = count - k, f"{count} - {k} = {count - k}"
    short = event[:-len(item) - 1] if event.endswith(f"more {item}") else event  # "Maya buys 3 more"
    ask = rng.choice([f"And if {event} after that?", f"What if {event} then?", f"Then {event}. How many now?",
                      f"Now {event}. How many {item} does {hero} have?", f"And if {event}?", f"And if {short}?",
                      f"What if {short}?"])
    answer = (f"Step 1: Before that, {hero} had {count} {item}.\nStep 2: {event[:1].upper() + event[1:]}, so "
              f"{hero} now has {math} {item}.\nAnswer: {hero} has {result} {item} now.")
    return _msgs(record["question"], record["solution"], ask, answer)


def arithmetic_follow_up(rng: random.Random, record: dict) -> dict:
    """An arithmetic question, its solution, then one more operation on the result."""
    value, k = record["answer"], rng.randint(2, 9)
    op, ask = rng.choice([("+", rng.choice([f"And if you add {k} to that?", f"Now add {k}.", f"Plus {k}?"])),
                          ("-", rng.choice([f"And if you subtract {k} from that?", f"Now take away {k}.",
                                            f"Minus {k}?"])),
                          ("*", rng.choice([f"And that times {k}?", f"Now multiply it by {k}.",
                                            f"What if we multiply that by {k}?"]))])
    result = {"+": value + k, "-": value - k, "*": value * k}[op]
    return _msgs(record["question"], record["solution"], ask, f"Step 1: {value} {op} {k} = {result}.\nAnswer: {result}")


# --- code requests in words ----------------------------------------------------------------------------------

# Everyday words for some of the generated functions: a user asks for "the square of a number", not for "x raised
# to the power 2", and a model trained in minutes only knows the words it was tuned on.
EVERYDAY_REQUESTS = {
    "power_of_2": ("returns the square of a number", "squares a number", "computes the square of x"),
    "power_of_3": ("returns the cube of a number", "cubes a number", "computes the cube of x"),
    "multiply_by_2": ("doubles a number", "returns twice a number", "returns double the number"),
    "multiply_by_3": ("triples a number", "returns three times a number"),
    "is_divisible_by_2": ("checks whether a number is even", "tells if a number is even"),
}


def python_parts(text: str) -> tuple[str, str, str]:
    """A generated Python exercise -> (signature + docstring, body, tests)."""
    close = text.index('"""\n', text.index('"""') + 3) + 4  # the end of the docstring
    body, _, tests = text[close:].partition("\n\n")
    return text[:close], body.rstrip("\n") + "\n", tests


def complete_request(prompt: str) -> str:
    """How a chat model is asked to finish a function (training and held-out scoring use the same words)."""
    return "Complete this function:\n" + prompt


def code_request(rng: random.Random, record: dict) -> dict:
    """A function asked for in words (its docstring's sentence), answered with the whole function, or as a
    signature and docstring to complete, answered with the signature line and the body: a tiny model that copies
    the docstring back garbles it (a wrong example, then a body that follows the wrong example), while the body
    right after the signature is what pretraining taught it to write."""
    prompt, body, _ = python_parts(record["text"])
    if rng.random() < 0.5:
        return _msgs(complete_request(prompt), prompt.split("\n")[0] + "\n" + body)
    doc = prompt.split('"""')[1].split("\n")[0].strip()
    signature = prompt.split("\n")[0][len("def "):-1]
    task = doc[:1].lower() + doc[1:].rstrip(".")
    user = rng.choice([f"Write a Python function {signature} that does this: {task}.",
                       f"Can you write a Python function called {signature.split('(')[0]}? It should {task}.",
                       f"I need a function {signature}. {doc}",
                       f"Write {signature} in Python. {doc}",
                       # Unnamed requests too, else "Write a Python function that ..." reads like the refused
                       # "Write a poem about ...": the chat model declined code it can write.
                       f"Write a Python function to {task}.",
                       f"Can you write a function in Python that will {task}?",
                       # "Write a Python function that returns the square of a number." was declined too
                       f"Write a Python function that {_third_person(task)}.",
                       f"I need a Python function that {_third_person(task)}."])
    return _msgs(user, prompt + body)


def everyday_request(rng: random.Random, record: dict) -> dict:
    """One of EVERYDAY_REQUESTS' functions asked for in everyday words, answered with the whole function."""
    prompt, body, _ = python_parts(record["text"])
    what = rng.choice(EVERYDAY_REQUESTS[record["entry_point"]])
    user = rng.choice([f"Write a Python function that {what}.", f"I need a Python function that {what}.",
                       f"Can you write a function that {what}?", f"Write a function which {what}."])
    return _msgs(user, prompt + body)


def _third_person(task: str) -> str:
    """"return the sum of `xs`" -> "returns the sum of `xs`" (the tasks start with a plain verb)."""
    verb, _, rest = task.partition(" ")
    return verb + ("es" if verb.endswith(("s", "sh", "ch", "x")) else "s") + (" " + rest if rest else "")


MAKERS = {"greeting": greeting, "identity": identity, "capabilities": capabilities, "refusal": refusal}
# Shares of the instruction-tuning set (the exercises fill the rest): enough chat for the model to learn its scope,
# and enough code that tuning keeps what pretraining taught about functions.
# One-event problems come before follow-ups, which continue them too.
SHARES = {"greeting": 0.03, "identity": 0.02, "capabilities": 0.02, "refusal": 0.04, "one_event_problem": 0.03,
          "follow_up": 0.06, "code_request": 0.12, "everyday_code": 0.01}


def sft_mix(records: list[dict], seed: int = 0, total: int | None = None) -> list[dict]:
    """The instruction-tuning conversations made from exercise records (shuffled, deterministic by seed).

    Exact dedup keeps each one-step arithmetic exercise once (they repeat in a small space), which leaves one in
    thirty solutions one step long, and an assistant tuned on that mix adds a second step to every one-step
    question. The one-step solutions are repeated until they are a third of the arithmetic, as in the generator's
    mix. Each conversation carries its `kind`."""
    rng = random.Random(f"phikit-conversations/{seed}")
    exercises, one_step, code, solved = [], [], [], []  # solved: short ones, whose follow-ups fit a context
    for r in records:
        kind = r.get("kind")
        if kind in ("arithmetic_easy", "arithmetic", "word_problem") and r.get("prompt") and \
                r["text"].startswith(r["prompt"]):
            r = dict(r, solution=r["text"][len(r["prompt"]):].strip())
            exercises.append(dict(_msgs(r["question"], r["solution"]), kind=kind))
            if r["solution"].count("Step ") <= 4:
                solved.append(r)
            if kind != "word_problem" and r["solution"].count("Step ") == 1:
                one_step.append(exercises[-1])
        elif kind == "python" and r.get("entry_point"):
            code.append(r)
    arithmetic = sum(c["kind"] != "word_problem" for c in exercises)
    if one_step:
        exercises += one_step * max(0, round((arithmetic - len(one_step)) / (2 * len(one_step))) - 1)
    n = total or round(len(exercises) / (1 - sum(SHARES.values())))
    convs = list(exercises)
    tells_stories = any(c["kind"] == "word_problem" for c in exercises)
    everyday = [r for r in code if r["entry_point"] in EVERYDAY_REQUESTS]
    for kind, share in SHARES.items():
        for _ in range(round(n * share)):
            if kind in MAKERS:
                conv = MAKERS[kind](rng)
            elif kind == "one_event_problem" and tells_stories:
                r = one_event_problem(rng)
                solved.append(r)  # follow-ups continue these too
                conv = _msgs(r["question"], r["solution"])
            elif kind == "follow_up" and solved:
                r = rng.choice(solved)
                conv = (word_problem_follow_up if r["kind"] == "word_problem" else arithmetic_follow_up)(rng, r)
            elif kind == "code_request" and code:
                conv = code_request(rng, rng.choice(code))
            elif kind == "everyday_code" and everyday:
                conv = everyday_request(rng, rng.choice(everyday))
            else:
                continue
            convs.append(dict(conv, kind=kind))
    rng.shuffle(convs)
    return convs

