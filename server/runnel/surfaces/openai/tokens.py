"""``POST /tokenize`` and ``POST /detokenize`` for model apps, in vLLM's shapes:
``{"model", "prompt"}`` (or ``"messages"``, through the chat template) ->
``{"count", "max_model_len", "tokens"}``; ``{"model", "tokens"}`` -> ``{"prompt"}``.
Detokenizing needs the app's optional ``decode`` (runnel.generation.ModelApp)."""

from __future__ import annotations

from ...http import json_response
from .api import OpenAIAPI, chat_prompt_tokens, detokenizer, off_loop
from .params import _messages, check_prompt_size, check_token_ids, invalid

TOKENIZE_FIELDS = frozenset({"model", "prompt", "messages"})
DETOKENIZE_FIELDS = frozenset({"model", "tokens"})


class TokenEndpoints:
    def __init__(self, api: OpenAIAPI) -> None:
        self.api = api

    async def tokenize(self, request):
        body = await self.api.body(request, TOKENIZE_FIELDS, frozenset())
        app = self.api.app_by_model(_model(body))
        has_messages = body.get("messages") is not None
        if has_messages == (body.get("prompt") is not None):
            raise invalid("prompt", "Exactly one of 'prompt' and 'messages' is required.",
                          "invalid_value" if has_messages else "missing_required_parameter")
        if has_messages:
            tokens = await chat_prompt_tokens(app, _messages(body))
        else:
            prompt = body["prompt"]
            if type(prompt) is not str:
                raise invalid("prompt", "Invalid type for 'prompt': expected a string.", "invalid_type")
            check_prompt_size("prompt", len(prompt), app.context_length)
            tokens = await off_loop(len(prompt), app.tokenize, prompt)
        return json_response({"count": len(tokens), "max_model_len": app.context_length, "tokens": tokens})

    async def detokenize(self, request):
        body = await self.api.body(request, DETOKENIZE_FIELDS, frozenset())
        app = self.api.app_by_model(_model(body))
        tokens = body.get("tokens")
        if tokens is None:
            raise invalid("tokens", "Missing required parameter: 'tokens'.", "missing_required_parameter")
        if type(tokens) is not list or not all(type(token) is int for token in tokens):
            raise invalid("tokens", "Invalid type for 'tokens': expected an array of token ids.", "invalid_type")
        check_token_ids("tokens", [tokens], app)
        decode = detokenizer(app, "tokens")
        return json_response({"prompt": await off_loop(len(tokens), decode, tokens)})


def _model(body: dict) -> str | None:
    model = body.get("model")
    if model is not None and type(model) is not str:
        raise invalid("model", "Invalid type for 'model': expected a string.", "invalid_type")
    return model
