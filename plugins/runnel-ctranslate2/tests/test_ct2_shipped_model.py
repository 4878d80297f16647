"""The trained builtin:tiny that ships in the package, served as the default config serves it."""

from __future__ import annotations

import openai


CONFIG = {"apps": {"tiny": {"backend": "ctranslate2", "model": "builtin:tiny", "device": "cpu",
                            "intra_threads": 1, "default_max_tokens": 64}}}


def test_the_shipped_model_answers_in_readable_english_and_stops(start_server):
    server = start_server(CONFIG)
    with openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0) as client:
        chat = client.chat.completions.create(
            model="tiny", temperature=0, messages=[{"role": "user", "content": "What is your name?"}])
        choice = chat.choices[0]
        # The template ends with "Assistant:" and the model writes " My": the space is
        # framing, so the message starts at "My" (streamed or not).
        assert choice.message.content == "My name is Runnel. I am a tiny language model."
        assert choice.finish_reason == "stop"
        stream = client.chat.completions.create(
            model="tiny", temperature=0, stream=True, messages=[{"role": "user", "content": "What is your name?"}])
        with stream:
            assert "".join(chunk.choices[0].delta.content or "" for chunk in stream) == choice.message.content
        # A completion continues its prompt, so there the leading space is content.
        completion = client.completions.create(model="tiny", prompt="The cat", temperature=0)
        assert completion.choices[0].text == " finds a green leaf."
        assert completion.choices[0].finish_reason == "stop"
