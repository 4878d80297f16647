"""Train the demo model shipped as ``builtin:tiny`` (runnel_ctranslate2/models/tiny/).

A maintainer tool, not part of the package: it needs torch, which neither runnel nor the
plugin depends on. Users and CI never run it; they load the directory it writes.

What it does, all from fixed seeds and with no downloaded data:

1. generates a corpus of simple English: short sentences and stories, and chat exchanges
   written exactly as the "plain" chat template renders them
   (``<s>User: ...\\nAssistant: ...</s>``: every assistant turn ends with ``</s>``, the
   end of turn the server stops on), every example ending with ``</s>``; some exchanges
   ask what the model cannot know, and are answered with "I do not know"; a third of the
   corpus offers the demo tools (DEMO_TOOLS: get_weather, calculate, get_time) and calls
   them in the Hermes format, rendered through the same template as a client's tools,
   calls and results (``Tools: ...`` line, ``<tool_call>{...}</tool_call>``, ``Tool: ...``);
2. trains a sentencepiece BPE vocabulary on it (byte fallback, identity normalization:
   the same trainer settings as the random built-in model, plus ``<tool_call>`` and
   ``</tool_call>`` as single pieces);
3. trains a small Llama-style decoder with CPU torch (RMSNorm, rotary positions in Hugging
   Face's rotate_half layout, SiLU-gated FFN, no biases, tied embeddings);
4. checks that CTranslate2 computes the same logits as torch (a float32 export), then
   writes the model with int8 weights through ``write_decoder_model`` (the same writer as
   the random built-in model) and greedy-generates from a few prompts with it.

Rebuild (from the repository root; torch goes in a separate environment):

    python3 -m venv /tmp/trainenv
    /tmp/trainenv/bin/pip install torch numpy sentencepiece ctranslate2 jinja2
    /tmp/trainenv/bin/python plugins/runnel-ctranslate2/scripts/train_tiny.py

The plugin's modules are imported from this checkout (no install needed). Training takes
about 8 minutes on two idle CPU cores (0.17 s a step; 25 minutes on a busy shared machine);
same torch version and thread count, same bytes.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PLUGIN_DIR = Path(__file__).resolve().parents[1]
CORE_DIR = PLUGIN_DIR.parents[1] / "server"  # runnel.chat_template
for path in (PLUGIN_DIR, CORE_DIR):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from runnel_ctranslate2.builtin import (  # noqa: E402
    TINY_CHAT_TEMPLATE,
    _train_sentencepiece,
    write_decoder_model,
)
from runnel.chat_template import ChatTemplate  # noqa: E402
from runnel_ctranslate2.tokenizer import SentencePieceTokenizer  # noqa: E402

DEFAULT_OUT = PLUGIN_DIR / "runnel_ctranslate2" / "models" / "tiny"

# ---------------------------------------------------------------------------------------
# The corpus
# ---------------------------------------------------------------------------------------

# (noun phrase without article, pronoun, kind); kind picks the verbs that make sense.
_ANIMALS = [
    ("cat", "It"), ("dog", "It"), ("bird", "It"), ("fox", "It"), ("rabbit", "It"),
    ("horse", "It"), ("mouse", "It"), ("duck", "It"), ("bear", "It"), ("fish", "It"),
]
_PEOPLE = [
    ("girl", "She"), ("boy", "He"), ("teacher", "She"), ("farmer", "He"),
    ("old man", "He"), ("old woman", "She"), ("baker", "He"), ("student", "She"),
    ("king", "He"), ("queen", "She"), ("doctor", "She"), ("painter", "He"),
]
_ADJECTIVES = [
    "little", "big", "happy", "old", "young", "brown", "white", "clever", "sleepy",
    "brave", "small", "kind", "quiet", "funny",
]
# Verb phrases: (third person singular, base form). Animals and people both.
_INTRANSITIVE = [
    ("sleeps", "sleep"), ("runs", "run"), ("walks", "walk"), ("jumps", "jump"),
    ("plays", "play"), ("rests", "rest"), ("waits", "wait"), ("sits", "sit"),
]
_OBJECTS = {
    ("sees", "see"): ["a red ball", "the moon", "a tall tree", "the river", "a little bird",
                      "a blue boat", "the stars", "a big house"],
    ("likes", "like"): ["the warm sun", "a red ball", "the garden", "fresh water",
                        "the quiet night", "long walks"],
    ("finds", "find"): ["a red ball", "a small box", "a shiny key", "an old hat",
                        "a green leaf"],
    ("eats", "eat"): ["an apple", "some bread", "a piece of cheese", "a bowl of soup",
                      "a sweet cake", "some carrots"],
    ("drinks", "drink"): ["some water", "a cup of tea", "warm milk"],
    ("watches", "watch"): ["the rain", "the sunset", "the birds", "the river", "the clouds"],
}
# Only people do these.
_PEOPLE_OBJECTS = {
    ("reads", "read"): ["a book", "a letter", "a long story", "the newspaper", "the map"],
    ("writes", "write"): ["a letter", "a short poem", "a story", "a song"],
    ("opens", "open"): ["the door", "the window", "a box", "the gate"],
    ("cooks", "cook"): ["some soup", "a big dinner", "rice and beans"],
    ("paints", "paint"): ["a picture", "the fence", "a blue sky"],
}
_PLACES = [
    "in the garden", "by the river", "at home", "in the park", "near the old bridge",
    "under the tree", "on the hill", "in the kitchen", "by the window", "in the forest",
    "near the sea", "in the small town",
]
_TIMES = [
    "in the morning", "at night", "every day", "after lunch", "on sunday",
    "before dinner", "in the evening", "all day",
]
_ENDINGS = [
    "{P} is very happy.", "Then {p} goes home.", "The sun is warm.", "It is a good day.",
    "{P} smiles.", "Everyone is happy.", "Then {p} goes to sleep.", "The day is calm and quiet.",
]
_WEATHER = [
    "sunny and warm", "cold and windy", "rainy", "cloudy but warm", "clear and bright",
    "cool and calm",
]
_COLORS = {
    "sky": "blue", "grass": "green", "snow": "white", "sun": "yellow", "night": "dark",
    "sea": "blue", "apple": "red", "banana": "yellow", "leaf": "green", "cloud": "white",
    "orange": "orange", "strawberry": "red",
}
_DEFINITIONS = {
    "cat": "A cat is a small animal that likes to sleep and play.",
    "dog": "A dog is a friendly animal that likes to run and play.",
    "bird": "A bird is an animal with wings. Most birds can fly.",
    "fish": "A fish is an animal that lives in water.",
    "horse": "A horse is a big and strong animal that can run fast.",
    "tree": "A tree is a tall plant with a trunk, branches and leaves.",
    "river": "A river is a long stream of water that flows to the sea.",
    "book": "A book is a set of pages with words and stories.",
    "house": "A house is a building where people live.",
    "computer": "A computer is a machine that follows instructions.",
    "teacher": "A teacher is a person who helps people learn.",
    "farmer": "A farmer is a person who grows food.",
    "apple": "An apple is a round fruit. It can be red or green.",
    "moon": "The moon goes around the earth and shines at night.",
    "sun": "The sun is a star. It gives us light and warmth.",
    "rain": "Rain is water that falls from the clouds.",
    "language model": "A language model is a program that writes text one word at a time.",
}
_HOMES = {
    "fish": "in the water", "bird": "in a nest in a tree", "cow": "on a farm",
    "bear": "in the forest", "fox": "in the forest", "duck": "near the pond",
    "rabbit": "in a hole in the ground", "horse": "on a farm", "cat": "in a warm house",
    "dog": "in a house with its family", "lion": "in the grassland", "bee": "in a hive",
}
_LIKEABLE = [
    "music", "books", "cats", "dogs", "the rain", "flowers", "the sea", "apples",
    "long walks", "stories", "the sun", "tea",
]
# (questions, answers); the first answer is the usual one.
_CHAT_FIXED = [
    (["What is your name?", "What's your name?", "Tell me your name.",
      "What should I call you?", "Do you have a name?"],
     ["My name is Runnel. I am a tiny language model.",
      "I am Runnel, a tiny language model."]),
    (["Who are you?", "What are you?", "Are you a robot?"],
     ["I am Runnel, a tiny language model. I write short and simple sentences.",
      "I am a tiny language model called Runnel."]),
    (["Hello!", "Hi!", "Hello.", "Hi there!", "Good morning!", "Hey!", "Hello, Runnel!"],
     ["Hello! How can I help you today?", "Hi! How can I help you?"]),
    (["How are you?", "How are you today?", "How are you doing?", "How is it going?"],
     ["I am fine, thank you. How can I help you today?", "I am very well, thank you!"]),
    (["Can you help me?", "I need help.", "Can you help me, please?"],
     ["Of course. What do you need?", "Yes, I can try. What do you need?"]),
    (["Thank you!", "Thanks.", "Thank you very much.", "Thanks a lot!"],
     ["You are welcome!", "You are welcome. Have a nice day!"]),
    (["Goodbye.", "Bye!", "See you later.", "Good night!"],
     ["Goodbye! Have a nice day.", "Goodbye! See you soon."]),
    (["What can you do?", "What are you good at?", "How can you help me?"],
     ["I can write short sentences and answer simple questions.",
      "I can answer simple questions and tell short stories."]),
    (["What time is it?", "What day is it today?"],
     ["I do not know the time. I am only a tiny model.",
      "I am sorry, I do not have a clock."]),
    (["Where do you live?", "Where are you?"],
     ["I live inside a small computer.", "I live on a server, inside a small computer."]),
    (["What is your favorite color?", "Which color do you like best?"],
     ["My favorite color is blue, like the sky."]),
    (["What is your favorite animal?", "Which animal do you like best?"],
     ["I like cats very much. They are soft and calm."]),
    (["Why is the sky blue?"],
     ["The sky is blue because the air scatters blue light from the sun."]),
    (["Are you happy?", "Do you feel good?"],
     ["Yes, I am happy when I can help you."]),
    (["What is runnel?", "What is Runnel?"],
     ["Runnel is a small server that runs language models."]),
]
# Questions the model cannot answer, and the turn it ends with instead of making one up
# (without them it answers an unfamiliar prompt with a question of its own, then a turn).
_UNKNOWN_TOPICS = [
    "astronomy", "the stock market", "taxes", "the history of Rome", "chess",
    "climate change", "the internet", "politics", "mathematics", "cooking", "football",
    "the capital of Spain", "black holes", "my homework", "love", "money", "the news",
]
_UNKNOWN_QUESTIONS = [
    "Explain {t}.", "What do you know about {t}?", "Tell me everything about {t}.",
    "Can you help me with {t}?", "What is your opinion on {t}?", "Write an essay about {t}.",
    "Tell me something funny.", "What should I wear today?", "What is 5 + 3?", "I am tired.",
    "Write a poem.", "Translate this into German.", "Describe the city.",
    "What will happen tomorrow?", "Why?", "Is it true?", "What do you think?",
]
_UNKNOWN_ANSWERS = [
    "I am sorry, I do not know. I am only a tiny model.",
    "I do not know much about that. I can answer simple questions.",
]
_SYSTEM_PROMPTS = [
    "You are a helpful assistant.", "You are Runnel, a friendly assistant.",
    "You are a helpful assistant. Answer in short sentences.", "Be kind and brief.",
]


def _cap(s: str) -> str:
    return s[0].upper() + s[1:]


class _Writer:
    """Random sentences and chat turns from the templates above."""

    def __init__(self, rng: random.Random):
        self.rng = rng

    def choice(self, xs):
        return self.rng.choice(xs)

    def subject(self) -> tuple[str, str, bool]:
        """(noun phrase, pronoun, is_person)."""
        rng = self.rng
        person = rng.random() < 0.45
        noun, pronoun = self.choice(_PEOPLE if person else _ANIMALS)
        if rng.random() < 0.4:
            noun = f"{self.choice(_ADJECTIVES)} {noun}"
        article = "the" if rng.random() < 0.7 else ("an" if noun[0] in "aeiou" else "a")
        return f"{article} {noun}", pronoun, person

    def predicate(self, person: bool, plural: bool = False) -> str:
        rng = self.rng
        form = 1 if plural else 0
        r = rng.random()
        if r < 0.3:
            verb = self.choice(_INTRANSITIVE)[form]
            tail = self.choice(_PLACES) if rng.random() < 0.8 else self.choice(_TIMES)
            return f"{verb} {tail}"
        table = _OBJECTS
        if person and rng.random() < 0.5:
            table = _PEOPLE_OBJECTS
        verb = self.choice(list(table))
        phrase = f"{verb[form]} {self.choice(table[verb])}"
        if rng.random() < 0.5:
            phrase += f" {self.choice(_PLACES)}"
        elif rng.random() < 0.3:
            phrase += f" {self.choice(_TIMES)}"
        return phrase

    def sentence(self) -> str:
        rng = self.rng
        r = rng.random()
        if r < 0.12:
            subject = self.choice(["the children", "my friends", "the birds", "we", "they",
                                   "the dogs"])
            return _cap(f"{subject} {self.predicate(True, plural=True)}.")
        if r < 0.2:
            return f"I {self.predicate(True, plural=True)}."
        if r < 0.26:
            return f"Today the weather is {self.choice(_WEATHER)}."
        if r < 0.32:
            thing, color = self.choice(list(_COLORS.items()))
            return f"The {thing} is {color}."
        subject, pronoun, person = self.subject()
        return _cap(f"{subject} {self.predicate(person)}.")

    def story(self) -> str:
        rng = self.rng
        subject, pronoun, person = self.subject()
        noun = subject.split(" ", 1)[1]
        article = "an" if noun[0] in "aeiou" else "a"
        parts = [f"Once upon a time, there was {article} {noun} who lived {self.choice(_PLACES)}."]
        for _ in range(rng.randint(1, 2)):
            parts.append(f"{pronoun} {self.predicate(person)}.")
        parts.append(self.choice(_ENDINGS).format(P=pronoun, p=pronoun.lower()))
        return " ".join(parts)

    def text(self) -> str:
        """A completion example: one to three sentences."""
        rng = self.rng
        r = rng.random()
        if r < 0.2:
            return self.story()
        if r < 0.55:
            subject, pronoun, person = self.subject()
            first = _cap(f"{subject} {self.predicate(person)}.")
            second = f"{pronoun} {self.predicate(person)}."
            if rng.random() < 0.5:
                second = self.choice(_ENDINGS).format(P=pronoun, p=pronoun.lower())
            return f"{first} {second}"
        return self.sentence()

    def exchange(self) -> tuple[str, str]:
        """One (user, assistant) turn."""
        rng = self.rng
        if rng.random() < 0.06:
            q = self.choice(_UNKNOWN_QUESTIONS).format(t=self.choice(_UNKNOWN_TOPICS))
            return q, self.choice(_UNKNOWN_ANSWERS)
        r = rng.random()
        if r < 0.45:
            questions, answers = self.choice(_CHAT_FIXED)
            answer = answers[0] if len(answers) == 1 or rng.random() < 0.75 else answers[1]
            return self.choice(questions), answer
        if r < 0.55:
            thing = self.choice(list(_DEFINITIONS))
            article = "an" if thing[0] in "aeiou" else "a"
            if thing in ("moon", "sun", "rain"):
                q = f"What is the {thing}?" if thing != "rain" else "What is rain?"
            else:
                q = self.choice([f"What is {article} {thing}?", f"Tell me about {article} {thing}."])
            return q, _DEFINITIONS[thing]
        if r < 0.62:
            thing, color = self.choice(list(_COLORS.items()))
            return f"What color is the {thing}?", f"The {thing} is {color}."
        if r < 0.68:
            animal, home = self.choice(list(_HOMES.items()))
            return f"Where does the {animal} live?", f"The {animal} lives {home}."
        if r < 0.74:
            thing = self.choice(_LIKEABLE)
            return f"Do you like {thing}?", f"Yes, I like {thing} very much."
        if r < 0.8:
            return (self.choice(["What is the weather like?", "How is the weather today?"]),
                    f"Today the weather is {self.choice(_WEATHER)}.")
        if r < 0.9:
            q = self.choice(["Tell me a story.", "Can you tell me a story?",
                             "Tell me a short story.", "Please tell me a story."])
            return q, self.story()
        noun, _ = self.choice(_ANIMALS + _PEOPLE)
        article = "an" if noun[0] in "aeiou" else "a"
        q = self.choice([f"Write a sentence about {article} {noun}.",
                         f"Say something about the {noun}."])
        pronoun = dict(_ANIMALS + _PEOPLE)[noun]
        person = (noun, pronoun) in _PEOPLE
        return q, _cap(f"the {noun} {self.predicate(person)}.")

    def chat(self) -> list[dict]:
        rng = self.rng
        messages = []
        if rng.random() < 0.25:
            messages.append({"role": "system", "content": self.choice(_SYSTEM_PROMPTS)})
        for _ in range(1 if rng.random() < 0.8 else 2):
            user, assistant = self.exchange()
            messages += [{"role": "user", "content": user},
                         {"role": "assistant", "content": assistant}]
        return messages


# ---------------------------------------------------------------------------------------
# Tool calls (the Hermes format, as the plain template renders them)
# ---------------------------------------------------------------------------------------


def _tool(name: str, description: str, **params: str) -> dict:
    """A tool in the OpenAI shape a client sends."""
    return {"type": "function", "function": {
        "name": name, "description": description,
        "parameters": {"type": "object",
                       "properties": {p: {"type": "string", "description": d}
                                      for p, d in params.items()},
                       "required": list(params)}}}


# The demo tools: tests, README and examples use exactly these.
DEMO_TOOLS = {
    "get_weather": _tool("get_weather", "The current weather in a city.", city="A city name."),
    "calculate": _tool("calculate", "Evaluate an arithmetic expression.",
                       expression="For example 12 * 7."),
    "get_time": _tool("get_time", "The current time in a time zone.",
                      timezone="An IANA time zone, e.g. Europe/Paris."),
}
# Offered now and then but never called: the model must pick the tool that fits.
_DISTRACTOR_TOOLS = [
    _tool("search", "Search the web.", query="What to search for."),
    _tool("send_email", "Send an email.", to="The address.", subject="The subject line."),
]
# city -> IANA time zone: get_time's argument is looked up, not copied.
_CITY_ZONES = {
    "Paris": "Europe/Paris", "Rome": "Europe/Rome", "London": "Europe/London",
    "Berlin": "Europe/Berlin", "Madrid": "Europe/Madrid", "Lisbon": "Europe/Lisbon",
    "Dublin": "Europe/Dublin", "Amsterdam": "Europe/Amsterdam", "Vienna": "Europe/Vienna",
    "Athens": "Europe/Athens", "Prague": "Europe/Prague", "Warsaw": "Europe/Warsaw",
    "Stockholm": "Europe/Stockholm", "Oslo": "Europe/Oslo", "Helsinki": "Europe/Helsinki",
    "Moscow": "Europe/Moscow", "Istanbul": "Europe/Istanbul", "Cairo": "Africa/Cairo",
    "Nairobi": "Africa/Nairobi", "Lagos": "Africa/Lagos", "Cape Town": "Africa/Johannesburg",
    "Dubai": "Asia/Dubai", "Mumbai": "Asia/Kolkata", "Delhi": "Asia/Kolkata",
    "Bangkok": "Asia/Bangkok", "Singapore": "Asia/Singapore", "Hong Kong": "Asia/Hong_Kong",
    "Beijing": "Asia/Shanghai", "Shanghai": "Asia/Shanghai", "Seoul": "Asia/Seoul",
    "Tokyo": "Asia/Tokyo", "Sydney": "Australia/Sydney", "Melbourne": "Australia/Melbourne",
    "New York": "America/New_York", "Chicago": "America/Chicago",
    "Denver": "America/Denver", "Los Angeles": "America/Los_Angeles",
    "San Francisco": "America/Los_Angeles", "Toronto": "America/Toronto",
    "Mexico City": "America/Mexico_City", "Sao Paulo": "America/Sao_Paulo",
    "Buenos Aires": "America/Argentina/Buenos_Aires",
}
# Never in the corpus: the tests ask for the weather there, so the model must copy the
# city from the question rather than recall it.
HELD_OUT_CITIES = ("Zurich", "Boston", "Kyoto")
# Made-up towns, one or two words, so that copying (not recall) is what fits the corpus.
_SYLLABLES = ["ka", "lo", "mar", "ven", "ti", "ro", "bel", "san", "dor", "mi", "fen", "ha",
              "gri", "nel", "os", "tu", "vik", "la", "pen", "zu", "cor", "e", "an", "ber",
              "sil", "wa", "mon", "ta", "quin", "ly", "ras", "go"]
_TOWN_WORDS = ["New", "Port", "San", "Saint", "Lake", "North", "South", "East", "West",
               "Old", "Fort", "Mount"]
_CONDITIONS = ["sunny", "cloudy", "rainy", "windy", "snowy", "foggy", "clear", "stormy"]
_WEATHER_QUESTIONS = [
    "What's the weather in {c}?", "What is the weather in {c}?", "How is the weather in {c}?",
    "What is the weather like in {c}?", "Is it raining in {c}?", "Tell me the weather in {c}.",
    "Weather in {c}?", "How warm is it in {c} today?", "What's the weather like in {c} today?",
]
_TWO_CITY_QUESTIONS = [
    "What's the weather in {a} and in {b}?", "What is the weather in {a} and {b}?",
    "How is the weather in {a} and in {b}?",
]
_TIME_QUESTIONS = [
    "What time is it in {c}?", "What is the time in {c}?", "Tell me the time in {c}.",
    "What time is it now in {c}?", "Time in {c}?",
]
_CALC_QUESTIONS = [
    "What is {e}?", "Calculate {e}.", "How much is {e}?", "What is {e}? Please calculate it.",
    "Can you calculate {e}?", "Compute {e}.", "{e} = ?",
]
_OPERATORS = ["+", "-", "*", "/"]
# One piece each: a forced call's prompt ends with "<tool_call>" and must encode as the
# corpus does, where more text follows it.
TOOL_CALL_MARKERS = ("<tool_call>", "</tool_call>")


class _ToolWriter:
    """Conversations that offer tools: calls, their results and the answers."""

    def __init__(self, rng: random.Random, writer: _Writer):
        self.rng = rng
        self.writer = writer
        self.calls = 0

    def choice(self, xs):
        return self.rng.choice(xs)

    def town(self) -> str:
        rng = self.rng
        if rng.random() < 0.5:
            return self.choice(list(_CITY_ZONES))
        word = "".join(self.choice(_SYLLABLES) for _ in range(rng.randint(2, 3)))
        word = _cap(word)
        r = rng.random()
        if r < 0.15:
            return f"{self.choice(_TOWN_WORDS)} {word}"
        if r < 0.22:
            return f"{word} City"
        return word

    def expression(self) -> tuple[str, int | float]:
        rng = self.rng
        op = self.choice(_OPERATORS)
        big = 10 ** rng.randint(1, 3)
        a, b = rng.randint(0, big), rng.randint(1, 10 ** rng.randint(1, 2))
        if op == "/":
            a = b * rng.randint(0, 99)  # whole results: "84", not "83.99999"
            return f"{a} / {b}", a // b
        result = {"+": a + b, "-": a - b, "*": a * b}[op]
        return f"{a} {op} {b}", result

    def offered(self, needed: list[str]) -> list[dict]:
        """The tools a request offers: the needed ones, maybe others, in any order."""
        rng = self.rng
        names = set(needed)
        for name in DEMO_TOOLS:
            if rng.random() < 0.5:
                names.add(name)
        tools = [DEMO_TOOLS[n] for n in names]
        if rng.random() < 0.25:
            tools.append(self.choice(_DISTRACTOR_TOOLS))
        rng.shuffle(tools)
        return tools

    def call(self, name: str, arguments: dict) -> dict:
        self.calls += 1
        return {"id": f"call_{self.calls}", "type": "function",
                "function": {"name": name, "arguments": arguments}}

    def task(self) -> tuple[str, list[dict], list[dict], str]:
        """(question, calls, results, answer) for one of the demo tools."""
        rng = self.rng
        r = rng.random()
        if r < 0.4:
            city = self.town()
            temperature = rng.randint(-10, 38)
            condition = self.choice(_CONDITIONS)
            result = {"city": city, "temperature": temperature, "condition": condition}
            return (self.choice(_WEATHER_QUESTIONS).format(c=city),
                    [self.call("get_weather", {"city": city})], [result],
                    f"It is {condition} and {temperature} degrees in {city}.")
        if r < 0.5:
            a, b = self.town(), self.town()
            while b == a:
                b = self.town()
            results = [{"city": c, "temperature": rng.randint(-10, 38),
                        "condition": self.choice(_CONDITIONS)} for c in (a, b)]
            answer = " ".join(f"It is {x['condition']} and {x['temperature']} degrees in "
                              f"{x['city']}." for x in results)
            return (self.choice(_TWO_CITY_QUESTIONS).format(a=a, b=b),
                    [self.call("get_weather", {"city": c}) for c in (a, b)], results, answer)
        if r < 0.75:
            expression, value = self.expression()
            return (self.choice(_CALC_QUESTIONS).format(e=expression),
                    [self.call("calculate", {"expression": expression})],
                    [{"expression": expression, "result": value}], f"{expression} is {value}.")
        city, zone = self.choice(list(_CITY_ZONES.items()))
        time_ = f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}"
        return (self.choice(_TIME_QUESTIONS).format(c=city),
                [self.call("get_time", {"timezone": zone})],
                [{"timezone": zone, "time": time_}], f"It is {time_} in {zone}.")

    def chat(self) -> tuple[list[dict], list[dict]]:
        """(messages, tools) for a conversation that offers tools."""
        rng = self.rng
        messages = []
        if rng.random() < 0.2:
            messages.append({"role": "system", "content": self.writer.choice(_SYSTEM_PROMPTS)})
        if rng.random() < 0.25:
            # A question no tool answers: the usual reply, no call.
            user, assistant = self.writer.exchange()
            messages += [{"role": "user", "content": user},
                         {"role": "assistant", "content": assistant}]
            return messages, self.offered([])
        if rng.random() < 0.1:
            user, assistant = self.writer.exchange()
            messages += [{"role": "user", "content": user},
                         {"role": "assistant", "content": assistant}]
        question, calls, results, answer = self.task()
        messages += [{"role": "user", "content": question},
                     {"role": "assistant", "content": None, "tool_calls": calls}]
        if rng.random() < 0.85:  # the round trip; otherwise the call turn alone
            for call, result in zip(calls, results, strict=True):
                messages.append({"role": "tool", "tool_call_id": call["id"],
                                 "content": json.dumps(result)})
            messages.append({"role": "assistant", "content": answer})
        return messages, self.offered(sorted({c["function"]["name"] for c in calls}))


def _no_tool_exchange(rng: random.Random) -> tuple[str, str]:
    """A tool question asked with no tools offered: answered as the model always has."""
    r = rng.random()
    if r < 0.4:
        city = rng.choice(list(_CITY_ZONES))
        return (rng.choice(_WEATHER_QUESTIONS).format(c=city),
                f"Today the weather is {rng.choice(_WEATHER)}.")
    if r < 0.7:
        city = rng.choice(list(_CITY_ZONES))
        return (rng.choice(_TIME_QUESTIONS).format(c=city),
                rng.choice(["I do not know the time. I am only a tiny model.",
                            "I am sorry, I do not have a clock."]))
    a, b = rng.randint(0, 99), rng.randint(1, 99)
    return (rng.choice(_CALC_QUESTIONS).format(e=f"{a} {rng.choice(_OPERATORS)} {b}"),
            rng.choice(_UNKNOWN_ANSWERS))


def make_corpus(seed: int, examples: int) -> list[str]:
    """Training texts, each one sequence as the server will see it, ``<s>`` ... ``</s>``.

    Completions are what a raw prompt continues into (the server adds ``<s>``); chats are
    rendered with the model's own chat template, which ends each assistant turn with ``</s>``,
    tools and tool calls included, exactly as the server renders a client's conversation.
    """
    rng = random.Random(seed)
    writer = _Writer(rng)
    tool_writer = _ToolWriter(rng, writer)
    template = ChatTemplate(TINY_CHAT_TEMPLATE, bos_token="<s>", eos_token="</s>")
    out = []
    for _ in range(examples):
        r = rng.random()
        if r < 0.35:
            out.append(f"<s>{writer.text()}</s>")
            continue
        tools = None
        if r < 0.62:
            messages = writer.chat()
        elif r < 0.67:
            # What a tool would answer, asked with none offered: the model conditions on
            # the Tools line, not on the question, to decide to call.
            user, assistant = _no_tool_exchange(rng)
            messages = [{"role": "user", "content": user},
                        {"role": "assistant", "content": assistant}]
        else:
            messages, tools = tool_writer.chat()
        # The whole conversation as the template writes it: every assistant turn, earlier
        # ones too, ends with </s>, so the model learns to end its turn there (and never
        # that a user line follows a reply). The template's newline after the last </s>
        # is no part of the sequence.
        text = template.render(messages, tools=tools, add_generation_prompt=False)
        assert text.endswith("</s>\n")
        out.append(text[:-1])
    held_out = [c for c in HELD_OUT_CITIES if any(c in text for text in out)]
    assert not held_out, f"held-out cities in the corpus: {held_out}"
    return out


# ---------------------------------------------------------------------------------------
# The model (torch)
# ---------------------------------------------------------------------------------------


def build_torch_model(torch, vocab: int, d: int, layers: int, heads: int, ffn: int):
    nn = torch.nn
    F = torch.nn.functional
    eps = 1e-6

    class RMSNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(d))

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * self.weight

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attention_norm = RMSNorm()
            self.qkv = nn.Linear(d, 3 * d, bias=False)
            self.out = nn.Linear(d, d, bias=False)
            self.ffn_norm = RMSNorm()
            self.gate = nn.Linear(d, ffn, bias=False)
            self.up = nn.Linear(d, ffn, bias=False)
            self.down = nn.Linear(ffn, d, bias=False)

        def forward(self, x, cos, sin):
            b, t, _ = x.shape
            q, k, v = self.qkv(self.attention_norm(x)).split(d, dim=-1)
            q, k, v = (z.view(b, t, heads, d // heads).transpose(1, 2) for z in (q, k, v))
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.out(a.transpose(1, 2).reshape(b, t, d))
            h = self.ffn_norm(x)
            return x + self.down(F.silu(self.gate(h)) * self.up(h))

    def rotate(x, cos, sin):
        # Hugging Face's Llama layout (CTranslate2's rotary_interleave=False): the head's
        # first half pairs with its second half, x * cos + rotate_half(x) * sin.
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    class Decoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.embeddings = nn.Embedding(vocab, d)
            self.layers = nn.ModuleList(Block() for _ in range(layers))
            self.norm = RMSNorm()
            hd = d // heads
            inv_freq = 1.0 / (10000.0 ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
            self.register_buffer("inv_freq", inv_freq, persistent=False)
            for name, p in self.named_parameters():
                if p.dim() == 2:
                    std = 0.02
                    if name.endswith(("out.weight", "down.weight")):
                        std /= math.sqrt(2 * layers)
                    nn.init.normal_(p, std=std)

        def forward(self, ids):
            t = ids.shape[1]
            freqs = torch.outer(torch.arange(t, dtype=torch.float32), self.inv_freq)
            emb = torch.cat((freqs, freqs), dim=-1)
            cos, sin = emb.cos(), emb.sin()
            x = self.embeddings(ids)
            for layer in self.layers:
                x = layer(x, cos, sin)
            # Tied embeddings: the projection is the embedding matrix.
            return self.norm(x) @ self.embeddings.weight.T

    return Decoder()


def numpy_weights(model) -> dict[str, np.ndarray]:
    """The names write_decoder_model expects."""
    state = {k: v.detach().float().numpy().copy() for k, v in model.state_dict().items()}
    weights = {"embeddings": state["embeddings.weight"], "norm": state["norm.weight"]}
    weights["projection"] = weights["embeddings"]  # tied: written once, aliased
    for i in range(len(model.layers)):
        for name in ("attention_norm", "ffn_norm"):
            weights[f"layers.{i}.{name}"] = state[f"layers.{i}.{name}.weight"]
        for name in ("qkv", "out", "gate", "up", "down"):
            weights[f"layers.{i}.{name}"] = state[f"layers.{i}.{name}.weight"]
    return weights


# ---------------------------------------------------------------------------------------
# Training, export and checks
# ---------------------------------------------------------------------------------------


def length_buckets(rng, sequences: list[list[int]], batch_size: int, group: int = 8):
    """The next ``group`` batches: random sequences, sorted by length, cut into batches, so
    that each batch pads little (tool conversations are 4 times as long as a sentence)."""
    picked = sorted(rng.integers(0, len(sequences), batch_size * group),
                    key=lambda i: len(sequences[i]))
    batches = [[sequences[i] for i in picked[k:k + batch_size]]
               for k in range(0, len(picked), batch_size)]
    rng.shuffle(batches)
    return batches


def train(args, torch, sequences: list[list[int]], vocab: int):
    torch.manual_seed(args.seed)
    model = build_torch_model(torch, vocab, args.d_model, args.layers, args.heads, args.ffn)
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.dim() == 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95),
    )
    warmup = max(1, args.steps // 20)

    def lr_at(step):
        if step < warmup:
            return args.lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, args.steps - warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    data_rng = np.random.default_rng(args.seed)
    print(f"model: {n_params / 1e6:.2f}M parameters; training {args.steps} steps of "
          f"{args.batch_size} sequences on {torch.get_num_threads()} thread(s)", flush=True)
    start = time.perf_counter()
    model.train()
    running = None
    batches: list[list[int]] = []
    for step in range(args.steps):
        if not batches:
            batches = length_buckets(data_rng, sequences, args.batch_size)
        batch = batches.pop()
        length = max(len(s) for s in batch)
        ids = torch.zeros((len(batch), length), dtype=torch.long)
        mask = torch.zeros((len(batch), length), dtype=torch.bool)
        for row, seq in enumerate(batch):
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = True
        logits = model(ids[:, :-1])
        targets = ids[:, 1:].masked_fill(~mask[:, 1:], -100)  # no loss on padding
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, vocab), targets.reshape(-1), ignore_index=-100
        )
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {running:.3f}  {time.perf_counter() - start:6.1f}s",
                  flush=True)
    print(f"training took {time.perf_counter() - start:.1f}s", flush=True)
    model.eval()
    return model


def check_logits_match(torch, model, weights, sp_bytes, args, sequences) -> float:
    """Export in float32 and compare CTranslate2's logits with torch's: the layouts (fused
    qkv, rotary, gated FFN) must agree exactly, not just roughly."""
    import ctranslate2

    tmp = Path(tempfile.mkdtemp(prefix="tiny-f32-"))
    try:
        write_decoder_model(tmp, weights, sp_bytes, heads=args.heads,
                            max_position=args.max_position, quantization="float32")
        generator = ctranslate2.Generator(str(tmp), device="cpu", intra_threads=1)
        tokenizer = SentencePieceTokenizer(tmp / "tokenizer.model")
        worst = 0.0
        for seq in sequences[:8]:
            tokens = [tokenizer.id_to_token(i) for i in seq]
            ct2 = np.asarray(generator.forward_batch([tokens]))[0]
            with torch.no_grad():
                ref = model(torch.tensor([seq])).numpy()[0]
            worst = max(worst, float(np.abs(ct2 - ref).max()))
        del generator
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return worst


def _call_turn(name: str, arguments: dict) -> dict:
    return {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": name, "arguments": arguments}}]}


def _round_trip(question: str, name: str, arguments: dict, result: dict) -> list[dict]:
    """A question, the call that answers it, and the tool's result: the answer is next."""
    return [{"role": "user", "content": question}, _call_turn(name, arguments),
            {"role": "tool", "tool_call_id": "call_1", "content": json.dumps(result)}]


def tool_prompts(template: ChatTemplate) -> list[str]:
    """The prompts a server renders for tool requests; sample_outputs shows their replies."""
    weather, calculate, get_time = (DEMO_TOOLS[n] for n in ("get_weather", "calculate", "get_time"))
    every = [weather, calculate, get_time]

    def ask(question, tools):
        return template.render([{"role": "user", "content": question}], tools=tools)

    prompts = [
        ask("What's the weather in Paris?", [weather]),
        template.render(_round_trip("What's the weather in Paris?", "get_weather", {"city": "Paris"},
                                    {"city": "Paris", "temperature": 18, "condition": "sunny"}),
                        tools=[weather]),
        ask("What is 12 * 7?", every),
        template.render(_round_trip("What is 12 * 7?", "calculate", {"expression": "12 * 7"},
                                    {"expression": "12 * 7", "result": 84}), tools=every),
        ask("What time is it in Tokyo?", every),
        template.render(_round_trip("What time is it in Tokyo?", "get_time", {"timezone": "Asia/Tokyo"},
                                    {"timezone": "Asia/Tokyo", "time": "14:05"}), tools=every),
    ]
    prompts += [ask(f"What's the weather in {city}?", every) for city in HELD_OUT_CITIES]
    prompts += [
        ask("What is the weather in Paris and in Rome?", [weather]),
        ask("Hello!", every),
        ask("What is a dog?", every),
        ask("What's the weather in Paris?", None),
        ask("What is 5 + 3?", None),
        # Forced calls: the server continues the assistant turn (tool_choice "required",
        # then a named function).
        ask("What's the weather in Paris?", every) + " <tool_call>",
        ask("Hello!", every) + " <tool_call>",
        ask("What time is it in Tokyo?", every) + ' <tool_call>{"name": "get_time", "arguments":',
    ]
    return prompts


def sample_outputs(model_dir: Path, max_length: int = 96) -> list[tuple[str, str, str]]:
    """Greedy generations as the server makes them: (prompt, text, finish_reason)."""
    import ctranslate2

    tokenizer = SentencePieceTokenizer(model_dir / "tokenizer.model")
    template = ChatTemplate(TINY_CHAT_TEMPLATE, bos_token="<s>", eos_token="</s>")
    prompts = ["The cat", "Once upon a time", "The teacher", "Today the weather", "I"]
    chats = [
        [{"role": "user", "content": "What is your name?"}],
        [{"role": "user", "content": "Hello!"}],
        [{"role": "user", "content": "How are you today?"}],
        [{"role": "user", "content": "Tell me a story."}],
        [{"role": "user", "content": "What is a dog?"}],
        [{"role": "user", "content": "Do you like music?"}],
        [{"role": "system", "content": "You are a helpful assistant."},
         {"role": "user", "content": "What color is the sky?"}],
        [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello! How can I help you today?"},
         {"role": "user", "content": "Where does the fish live?"}],
    ]
    texts = prompts + [template.render(m, add_generation_prompt=True) for m in chats]
    texts += tool_prompts(template)
    batch = []
    for text in texts:
        add_bos = not text.startswith(tokenizer.bos_token)  # as GeneratorApp.tokenize
        batch.append([tokenizer.id_to_token(i) for i in tokenizer.encode(text, add_bos=add_bos)])
    generator = ctranslate2.Generator(str(model_dir), device="cpu", intra_threads=1)
    try:
        results = generator.generate_batch(batch, max_length=max_length, sampling_topk=1,
                                           include_prompt_in_result=False, return_end_token=True)
    finally:
        del generator
    out = []
    for text, result in zip(texts, results, strict=True):
        ids = result.sequences_ids[0]
        finish = "stop" if ids and ids[-1] == tokenizer.eos_id else "length"
        if finish == "stop":
            ids = ids[:-1]
        out.append((text, tokenizer.decode(ids), finish))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--examples", type=int, default=40000, help="corpus size")
    parser.add_argument("--vocab-size", type=int, default=1000)
    parser.add_argument("--d-model", type=int, default=160)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--ffn", type=int, default=640)
    parser.add_argument("--max-position", type=int, default=512,
                        help="model_max_length recorded for the server")
    parser.add_argument("--steps", type=int, default=2500)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quantization", default="int8",
                        help="weight type in model.bin (int8, float16, float32)")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()

    corpus = make_corpus(args.seed, args.examples)
    # The vocabulary is trained on the text without the special tokens.
    sp_text = [c.replace("<s>", "").replace("</s>", "") for c in corpus]
    sp_bytes = _train_sentencepiece(sp_text, args.vocab_size, TOOL_CALL_MARKERS)
    tmp_sp = Path(tempfile.mkdtemp(prefix="tiny-sp-"))
    (tmp_sp / "tokenizer.model").write_bytes(sp_bytes)
    tokenizer = SentencePieceTokenizer(tmp_sp / "tokenizer.model")
    shutil.rmtree(tmp_sp)
    # Encoded as the server encodes: "<s>"/"</s>" written as text become the tokens.
    sequences = [tokenizer.encode(text, add_bos=False) for text in corpus]
    lengths = [len(s) for s in sequences]
    print(f"corpus: {len(corpus)} examples, {sum(lengths)} tokens, longest {max(lengths)}; "
          f"vocabulary {tokenizer.vocab_size} pieces", flush=True)
    for text in corpus[:4]:
        print("  " + repr(text))
    assert all(s[0] == tokenizer.bos_id and s[-1] == tokenizer.eos_id for s in sequences)

    model = train(args, torch, sequences, tokenizer.vocab_size)
    weights = numpy_weights(model)

    worst = check_logits_match(torch, model, weights, sp_bytes, args, sequences)
    print(f"CTranslate2 float32 vs torch: max logit difference {worst:.2e}")
    if worst > 1e-3:
        print("error: CTranslate2 does not compute what torch trained", file=sys.stderr)
        return 1

    out = args.out
    if out.exists():
        shutil.rmtree(out)
    write_decoder_model(out, weights, sp_bytes, heads=args.heads,
                        max_position=args.max_position, quantization=args.quantization)
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"wrote {out} ({size / 1e6:.2f} MB, {args.quantization} weights)")

    samples = sample_outputs(out)
    for prompt, text, finish in samples:
        print(f"--- {prompt!r}\n    -> {text!r} [{finish}]")
    stops = sum(finish == "stop" for _, _, finish in samples)
    print(f"{stops} of {len(samples)} greedy replies ended with </s>")
    print(f"total {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
