"""runnel-markov: a Markov chain over the prompt's words, served as an OpenAI model.

    [apps.markov]
    backend = "markov"
"""

from __future__ import annotations

import random

from runnel import hookimpl
from runnel.simple_model import SimpleModel


class Markov(SimpleModel):
    """Starts at the prompt's first word; each next word is one that followed the
    current word somewhere in the prompt. A word nothing followed ends the answer."""

    supported = frozenset({"stop", "seed", "temperature"})

    def stream(self, prompt, params):
        words = prompt.split()
        follows: dict[str, list[str]] = {}
        for word, after in zip(words, words[1:]):
            follows.setdefault(word, []).append(after)
        pick = random.Random(params.seed).choice
        if params.temperature == 0:
            pick = lambda options: options[0]  # noqa: E731 (greedy: the first follower seen)
        word = words[0] if words else None
        space = ""
        while word is not None:
            yield space + word
            space = " "
            options = follows.get(word)
            word = pick(options) if options else None


@hookimpl
def runnel_register_backends(register):
    register("markov", Markov.from_config)
