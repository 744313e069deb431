"""A minimal OpenAI-compatible chat-completions server for the data tests: a tiny random phi model answers
(greedy decoding), with fault injection: a share of requests fail with 500, are rate-limited (429), or hang.

    python tests/data_teacher_server.py PORT FAULT_RATE
"""
from __future__ import annotations

import asyncio
import random
import re
import sys

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from phikit.config import PhiConfig
from phikit.model import build_model
from phikit.tokenizer import build_phi_tokenizer

PORT, FAULT_RATE = int(sys.argv[1]), float(sys.argv[2])
tok = build_phi_tokenizer()
model = build_model(PhiConfig(vocab_size=51200, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=2, max_position_embeddings=256, tokenizer_vocab_size=50295), seed=0)
model.eval()
faults = random.Random(0)
app = FastAPI()


def greedy(prompt: str, new_tokens: int = 10) -> tuple[str, int, int]:
    ids = tok.encode(prompt)[-32:]
    x = torch.tensor([ids])
    out = []
    with torch.no_grad():
        for _ in range(new_tokens):
            logits = model(x).logits[0, -1, :50295]
            nxt = int(logits.argmax())
            out.append(nxt)
            x = torch.cat([x, torch.tensor([[nxt]])], 1)
    return tok.decode(out), len(ids), len(out)


@app.get("/health")
def health():
    return {"ok": True}


@app.post("/v1/chat/completions")
async def chat(request: Request):
    body = await request.json()
    roll = faults.random()
    if roll < FAULT_RATE / 3:
        return JSONResponse({"error": "injected failure"}, status_code=500)
    if roll < 2 * FAULT_RATE / 3:
        return JSONResponse({"error": "slow down"}, status_code=429, headers={"Retry-After": "0"})
    if roll < FAULT_RATE:
        await asyncio.sleep(30)  # a hung request: the client must time out and retry
    prompt = body["messages"][-1]["content"]
    if "Educational score" in prompt:  # annotation requests: a rule stands in for the teacher's judgement
        extract = prompt.split("The extract:\n", 1)[1]
        score = min(5, extract.count('"""') // 2 + extract.count("#") // 3)
        text = f"The extract is code with some explanation.\nEducational score: {score}"
        n_in, n_out = len(prompt.split()), 10
    else:
        generated, n_in, n_out = await run_in_threadpool(greedy, prompt)
        topic = re.search(r"about (.+?) for", prompt)
        text = (f"Sure! Here is a text about {topic.group(1) if topic else 'it'}:\n"
                f"{prompt.split('.')[0]} explained: {generated}")
    return {"id": "cmpl-test", "object": "chat.completion", "model": body.get("model"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out}}


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=PORT, log_level="warning")
