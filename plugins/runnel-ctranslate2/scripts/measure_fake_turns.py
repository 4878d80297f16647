"""Count the built-in model's replies that write a turn of the conversation themselves.

A maintainer tool for ``builtin:tiny`` (or any model directory): it starts a real server
(``runnel serve``) with the model, sends a fixed set of chat prompts through the OpenAI
client, greedy and at the server's default temperature, and counts the replies that
contain a role marker of the chat template ("User:", "Assistant:", "System:") and the ones
that ran to ``max_tokens`` instead of ending their turn.

    .venv/bin/python plugins/runnel-ctranslate2/scripts/measure_fake_turns.py [MODEL_DIR]
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import openai

# Greetings, questions and requests the training corpus has, then some it has not.
PROMPTS = [
    "Hello!", "Hi!", "Hello.", "Hi there!", "Good morning!", "Hey!", "Hello, Runnel!",
    "How are you?", "How are you today?", "How are you doing?",
    "What is your name?", "Who are you?", "Are you a robot?", "What can you do?",
    "Can you help me?", "Thank you!", "Thanks a lot!", "Goodbye.", "Good night!",
    "What time is it?", "Where do you live?", "What is your favorite color?",
    "Why is the sky blue?", "Are you happy?", "What is runnel?",
    "What is a dog?", "What is a cat?", "Tell me about a tree.", "What is the moon?",
    "What is rain?", "What color is the grass?", "Where does the fish live?",
    "Do you like music?", "Do you like cats?", "How is the weather today?",
    "Tell me a story.", "Can you tell me a story?", "Tell me a short story.",
    "Please tell me a story.", "Write a sentence about a dog.", "Say something about the king.",
    # Off the corpus.
    "What is the capital of France?", "Can you write a poem about the sea?",
    "Explain quantum physics.", "What is 2 + 2?", "Translate 'hello' into French.",
    "I feel sad today.", "Tell me a joke.", "What should I eat for dinner?",
    "Describe your favorite place.",
]
ROLE_MARKERS = ("User:", "Assistant:", "System:")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def has_fake_turn(text: str) -> bool:
    return any(marker in text for marker in ROLE_MARKERS)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", default="builtin:tiny")
    parser.add_argument("--samples", type=int, default=4, help="sampled replies per prompt")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--show", action="store_true", help="print every reply")
    args = parser.parse_args(argv)

    port = free_port()
    model = args.model if args.model.startswith("builtin:") else str(Path(args.model).resolve())
    config = (f'[server]\nhost = "127.0.0.1"\nport = {port}\n[auth]\nkind = "none"\n'
              f'[apps.tiny]\nbackend = "ctranslate2"\nmodel = "{model}"\ndevice = "cpu"\n'
              f"default_max_tokens = {args.max_tokens}\n")
    with tempfile.TemporaryDirectory() as tmp:
        config_path = Path(tmp) / "runnel.toml"
        config_path.write_text(config)
        runnel = Path(sys.executable).with_name("runnel")
        server = subprocess.Popen([str(runnel), "serve", "--config", str(config_path)],
                                  cwd=tmp)
        try:
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none",
                                   max_retries=0, timeout=60)
            deadline = time.monotonic() + 60
            while True:
                try:  # /health answers 200 once every model is loaded
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5):
                        break
                except OSError:  # not listening yet, or 503 (urllib's HTTPError)
                    pass
                if time.monotonic() > deadline or server.poll() is not None:
                    print("error: the server did not start", file=sys.stderr)
                    return 1
                time.sleep(0.2)
            report(client, args)
        finally:
            server.terminate()
            server.wait(10)
    return 0


def report(client: openai.OpenAI, args) -> None:
    for label, settings in (("greedy", {"temperature": 0}),
                            ("default temperature", {"n": args.samples, "seed": 1})):
        fake = length = total = 0
        for prompt in PROMPTS:
            chat = client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": prompt}], **settings)
            for choice in chat.choices:
                total += 1
                text = choice.message.content or ""
                fake += has_fake_turn(text)
                length += choice.finish_reason == "length"
                if args.show or (label == "greedy" and prompt in
                                 ("Tell me a story.", "How are you today?", "Hello!")):
                    print(f"  [{label}] {prompt!r} -> {text!r} [{choice.finish_reason}]")
        print(f"{label}: {fake} of {total} replies contain a fake turn; "
              f"{length} ran to max_tokens", flush=True)


if __name__ == "__main__":
    sys.exit(main())
