"""An agent loop with the openai SDK: the model calls a tool through runnel, we run it, and
the model answers with its result.

    make serve                                          # the built-in model, in another terminal
    .venv/bin/python examples/agent.py "What's the weather in Paris?"
"""

import json
import os
import sys

from openai import OpenAI

client = OpenAI(base_url=os.environ.get("RUNNEL_URL", "http://127.0.0.1:8000") + "/v1", api_key="none")
tools = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


def get_weather(city: str) -> dict:  # stands in for a real weather service
    return {"city": city, "temperature": 18, "condition": "sunny"}


messages = [{"role": "user", "content": " ".join(sys.argv[1:]) or "What's the weather in Paris?"}]
for _ in range(5):  # a model that keeps calling tools gets five turns
    reply = client.chat.completions.create(model="tiny", messages=messages, tools=tools, temperature=0, max_tokens=64)
    message = reply.choices[0].message
    messages.append(message.model_dump(exclude_none=True))
    if not message.tool_calls:
        print(message.content)
        break
    for call in message.tool_calls:
        print(f"[calling {call.function.name}({call.function.arguments})]", file=sys.stderr)
        result = get_weather(**json.loads(call.function.arguments))
        messages.append({"role": "tool", "tool_call_id": call.id, "content": json.dumps(result)})
