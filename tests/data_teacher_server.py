"""phikit's own OpenAI-compatible server serving a tiny random model, behind fault injection, for the data tests:
a share of chat-completion requests fail with 500, are rate-limited (429), or hang. A second route,
/annotator/v1/chat/completions, stands in for a teacher that grades documents (a rule, not a model).

    python tests/data_teacher_server.py PORT FAULT_RATE
"""
from __future__ import annotations

import asyncio
import random
import sys

import uvicorn
from fastapi import Request
from fastapi.responses import JSONResponse

from phikit.config import PhiConfig
from phikit.model import build_model
from phikit.serve.app import create_app
from phikit.tokenizer import build_phi_tokenizer

PORT, FAULT_RATE = int(sys.argv[1]), float(sys.argv[2])
tok = build_phi_tokenizer()
model = build_model(PhiConfig(vocab_size=51200, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=2, max_position_embeddings=512, tokenizer_vocab_size=50295), seed=0)
app = create_app(model.eval(), tok, model_name="tiny")
faults = random.Random(0)


@app.middleware("http")
async def inject_faults(request: Request, call_next):
    if request.url.path.endswith("/chat/completions"):
        roll = faults.random()
        if roll < FAULT_RATE / 3:
            return JSONResponse({"error": "injected failure"}, status_code=500)
        if roll < 2 * FAULT_RATE / 3:
            return JSONResponse({"error": "slow down"}, status_code=429, headers={"Retry-After": "0"})
        if roll < FAULT_RATE:
            await asyncio.sleep(30)  # a hung request: the client must time out and retry
    return await call_next(request)


@app.post("/annotator/v1/chat/completions")
async def annotate(request: Request):
    body = await request.json()
    extract = body["messages"][-1]["content"].split("The extract:\n", 1)[1]
    score = min(5, extract.count('"""') // 2 + extract.count("#") // 3)
    text = f"The extract is code with some explanation.\nEducational score: {score}"
    return {"id": "a", "object": "chat.completion", "model": body.get("model"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 10, "total_tokens": 11}}


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=PORT, log_level="warning")
