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
        assert completion.choices[0].text == " sees a little bird. It is very happy."
        assert completion.choices[0].finish_reason == "stop"


# Chat prompts of the kinds the model was trained on (greetings, questions, stories).
SHORT_CHATS = [
    "Hello!", "Hi!", "Hello.", "Good morning!", "How are you?", "How are you today?",
    "What is your name?", "Who are you?", "What can you do?", "Can you help me?",
    "Thank you!", "Goodbye.", "What time is it?", "Where do you live?", "Why is the sky blue?",
    "What is a dog?", "What is a cat?", "What is the moon?", "What color is the grass?",
    "Where does the fish live?", "Do you like music?", "How is the weather today?",
    "Tell me a story.", "Can you tell me a story?", "Tell me a short story.",
    "Write a sentence about a dog.",
]
ROLE_MARKERS = ("User:", "Assistant:", "System:")


def _fake_turns(replies: dict) -> dict:
    return {key: reply for key, reply in replies.items() if any(m in reply[0] for m in ROLE_MARKERS)}


def test_the_shipped_model_ends_its_turn_instead_of_writing_the_users(start_server):
    """The model ends each reply with the template's end of turn (</s>), which the server
    stops on: no reply goes on to write a "User: ..." line, and none runs to max_tokens.
    (The model before the end of turn wrote one in about one sampled reply in five.)"""
    server = start_server(CONFIG)
    greedy, sampled = {}, {}
    with openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0) as client:
        for prompt in SHORT_CHATS:
            messages = [{"role": "user", "content": prompt}]
            chat = client.chat.completions.create(model="tiny", temperature=0, messages=messages)
            greedy[prompt] = (chat.choices[0].message.content, chat.choices[0].finish_reason)
            # At the server's default temperature, seeded so the test is repeatable.
            chat = client.chat.completions.create(model="tiny", n=4, seed=7, messages=messages)
            for choice in chat.choices:
                sampled[prompt, choice.index] = (choice.message.content, choice.finish_reason)
        # A reply in a longer conversation ends its turn the same way.
        chat = client.chat.completions.create(model="tiny", temperature=0, messages=[
            {"role": "user", "content": "Hi!"},
            {"role": "assistant", "content": "Hello! How can I help you today?"},
            {"role": "user", "content": "Tell me a story."}])
        greedy["(second turn)"] = (chat.choices[0].message.content, chat.choices[0].finish_reason)
    assert _fake_turns(greedy) == {}
    # Sampling at temperature 1 can still pick a newline over </s> now and then (1 of these
    # 104 replies); the model without the end of turn wrote a fake turn in 21 of them.
    assert len(_fake_turns(sampled)) <= 2, _fake_turns(sampled)
    assert {prompt: reply for prompt, reply in greedy.items() if reply[1] != "stop"} == {}
    # The end of turn is the eos token: it ends the reply and is never part of its text.
    assert not [reply for reply in greedy.values() if "</s>" in reply[0] or not reply[0].strip()]
