"""A request's sampling settings as a llama.cpp sampler chain, and constraints as a grammar.

The chain, in llama.cpp's order: the request's ``logit_bias``, penalties (repetition,
presence, frequency: over the tokens this row generated, which are the ones the chain
accepts, as OpenAI counts them), the grammar (a forced tool call, or ``response_format``),
then greedy or top-k / top-p / temperature and a seeded draw. A per-request ``seed`` seeds
the draw (choice ``i`` of ``n`` with ``seed + i``, so they differ and each repeats); without
one, llama.cpp seeds it at random. ``ignore_eos`` is not the chain's: the end token may
still be picked, and the row goes on past it (as in vLLM and the CTranslate2 app).
"""

from __future__ import annotations

import functools
import json
import re

from runnel import HTTPError
from runnel.generation import SamplingParams

# A row's own seed when the request gives none: llama.cpp's "pick one at random".
_RANDOM_SEED = 0xFFFFFFFF


def _bad_format(message: str) -> HTTPError:
    return HTTPError(400, message, param="response_format", code="invalid_value")


@functools.lru_cache(maxsize=64)
def _schema_grammar(schema_json: str) -> str:
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    try:
        return json_schema_to_gbnf(schema_json)
    except (ValueError, KeyError, TypeError, AssertionError, NotImplementedError, RecursionError) as error:
        raise _bad_format(f"Invalid 'response_format.json_schema.schema': llama.cpp cannot follow it "
                          f"({type(error).__name__}: {error}).") from None


@functools.lru_cache(maxsize=64)
def _tool_call_grammar(schema_json: str, suffix: str) -> str:
    """One JSON value the schema allows, then the text that closes the call."""
    try:
        value = _schema_grammar(schema_json)
    except HTTPError as error:
        raise HTTPError(400, error.message.replace("response_format.json_schema.schema", "tools"), param="tools",
                        code="invalid_value") from None
    return re.sub(r"^root ::=", "forced-call ::=", value, count=1, flags=re.MULTILINE) + \
        f"\nroot ::= forced-call {json.dumps(suffix)}\n"


def grammar_for(params: SamplingParams) -> str | None:
    """The GBNF grammar a forced tool call or a ``response_format`` asks for (None: free
    text). The surface has checked the shapes (``runnel.surfaces.openai.params``,
    ``runnel.tools``); a schema llama.cpp's converter can't take is a 400 naming it.
    Converted schemas are cached: clients repeat them."""
    if params.tool_call is not None:  # the reply is the call; response_format is for text
        call = params.tool_call
        return _tool_call_grammar(json.dumps(call["schema"]), call["suffix"])
    response_format = params.response_format
    if not response_format or response_format.get("type") == "text":
        return None
    if response_format.get("type") == "json_object":
        from llama_cpp.llama_grammar import JSON_GBNF

        return JSON_GBNF
    schema = (response_format.get("json_schema") or {}).get("schema")
    if schema is None:
        schema = {}  # OpenAI accepts a json_schema without a schema: any JSON value
    if not isinstance(schema, dict):
        raise _bad_format("Invalid 'response_format.json_schema.schema': expected a JSON schema object.")
    return _schema_grammar(json.dumps(schema))  # key order kept: it is the output's


class Sampler:
    """One row's sampler chain; a context manager that frees it (the chain owns its samplers)."""

    __slots__ = ("_chain", "_ctx", "_sample")

    def __init__(self, llama, params: SamplingParams, grammar: str | None, *, seed_offset: int = 0) -> None:
        import llama_cpp

        self._ctx = llama._ctx.ctx
        self._sample = llama_cpp.llama_sampler_sample
        self._chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        try:
            self._build(llama_cpp, llama, params, grammar, seed_offset)
        except BaseException:
            self.close()
            raise

    def _add(self, llama_cpp, sampler) -> None:
        llama_cpp.llama_sampler_chain_add(self._chain, sampler)

    def _build(self, llama_cpp, llama, params: SamplingParams, grammar: str | None, seed_offset: int) -> None:
        n_vocab = llama.n_vocab()
        if params.logit_bias:  # added to the logits, as OpenAI's -100..100
            array = (llama_cpp.llama_logit_bias * len(params.logit_bias))()
            for item, (token, bias) in zip(array, params.logit_bias, strict=True):
                item.token, item.bias = token, bias
            self._add(llama_cpp, llama_cpp.llama_sampler_init_logit_bias(n_vocab, len(params.logit_bias), array))
        if params.repetition_penalty != 1.0 or params.presence_penalty or params.frequency_penalty:
            self._add(llama_cpp, llama_cpp.llama_sampler_init_penalties(
                n_vocab, llama.n_ctx(), params.repetition_penalty, params.frequency_penalty,
                params.presence_penalty))
        if grammar is not None:
            compiled = llama_cpp.llama_sampler_init_grammar(llama._model.vocab, grammar.encode(), b"root")
            if not compiled:  # NULL: llama.cpp could not parse what the converter wrote
                raise _bad_format("llama.cpp could not compile a grammar for this 'response_format'.")
            self._add(llama_cpp, compiled)
        if params.temperature == 0 or params.top_k == 1:
            self._add(llama_cpp, llama_cpp.llama_sampler_init_greedy())
            return
        if params.top_k > 0:
            self._add(llama_cpp, llama_cpp.llama_sampler_init_top_k(params.top_k))
        if params.top_p < 1.0:
            self._add(llama_cpp, llama_cpp.llama_sampler_init_top_p(params.top_p, 1))
        self._add(llama_cpp, llama_cpp.llama_sampler_init_temp(params.temperature))
        seed = _RANDOM_SEED if params.seed is None else (params.seed + seed_offset) % _RANDOM_SEED
        self._add(llama_cpp, llama_cpp.llama_sampler_init_dist(seed))

    def sample(self) -> int:
        """The next token from the last evaluated position's logits (and accept it: the
        penalties and the grammar move on)."""
        return self._sample(self._chain, self._ctx, -1)

    def close(self) -> None:
        if self._chain is not None:
            import llama_cpp

            llama_cpp.llama_sampler_free(self._chain)
            self._chain = None

    def __enter__(self) -> Sampler:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
