"""The server a user would otherwise write: FastAPI + sse-starlette + CTranslate2.

    python benchmarks/peers/fastapi_ct2.py --port P --model-dir DIR [--inter-threads 2 --intra-threads 1]

POST /v1/completions, OpenAI-ish, written plainly from the libraries' documentation: each
request iterates ``Generator.generate_tokens`` (a batch of one), and sse-starlette runs that
plain (sync) generator in Starlette's thread pool, so a worker thread is held per open stream.
No batching across requests beyond CTranslate2's own queue of ``inter_threads`` workers.
"""

import argparse
import json
import os
import time
import uuid

import ctranslate2
import sentencepiece as spm
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel
from sse_starlette.sse import EventSourceResponse


class CompletionRequest(BaseModel):
    model: str = "tiny"
    prompt: str
    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    ignore_eos: bool = False
    stream: bool = False
    stream_options: dict | None = None


def make_app(model_dir: str, inter_threads: int, intra_threads: int, compute_type: str = "default") -> FastAPI:
    generator = ctranslate2.Generator(model_dir, device="cpu", inter_threads=inter_threads,
                                      intra_threads=intra_threads, compute_type=compute_type)
    sp = spm.SentencePieceProcessor(model_file=os.path.join(model_dir, "tokenizer.model"))
    app = FastAPI()

    def generate(request: CompletionRequest):
        """(text piece, finish reason or None) per generated token."""
        prompt = [sp.id_to_piece(sp.bos_id())] + sp.encode(request.prompt, out_type=str)
        options = dict(max_length=request.max_tokens, sampling_temperature=request.temperature or 1.0,
                       sampling_topk=1 if request.temperature == 0 else request.top_k or 0)
        if request.ignore_eos:
            options.update(end_token=[], min_length=request.max_tokens)
        count = 0
        for step in generator.generate_tokens(prompt, **options):
            count += 1
            if step.token_id == sp.eos_id() and not request.ignore_eos:
                yield "", "stop"
                return
            text = "" if sp.is_control(step.token_id) else step.token.replace("\u2581", " ")
            yield text, "length" if count == request.max_tokens else None

    @app.post("/v1/completions")
    async def completions(request: CompletionRequest):
        head = {"id": "cmpl-" + uuid.uuid4().hex, "object": "text_completion", "created": int(time.time()),
                "model": request.model}
        prompt_tokens = len(sp.encode(request.prompt)) + 1
        if not request.stream:
            pieces = list(generate(request))
            text = "".join(piece for piece, _ in pieces)
            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": len(pieces),
                     "total_tokens": prompt_tokens + len(pieces)}
            return {**head, "choices": [{"index": 0, "text": text, "logprobs": None,
                                         "finish_reason": pieces[-1][1] if pieces else "length"}], "usage": usage}

        def events():
            count = 0
            for text, reason in generate(request):
                count += 1
                yield json.dumps({**head, "choices": [{"index": 0, "text": text, "logprobs": None,
                                                       "finish_reason": reason}]})
            if (request.stream_options or {}).get("include_usage"):
                yield json.dumps({**head, "choices": [], "usage": {
                    "prompt_tokens": prompt_tokens, "completion_tokens": count,
                    "total_tokens": prompt_tokens + count}})
            yield "[DONE]"

        return EventSourceResponse(events())

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "tiny", "object": "model", "owned_by": "me"}]}

    return app


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--inter-threads", type=int, default=2)
    parser.add_argument("--intra-threads", type=int, default=1)
    parser.add_argument("--compute-type", default="default")
    args = parser.parse_args()
    app = make_app(args.model_dir, args.inter_threads, args.intra_threads, args.compute_type)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
