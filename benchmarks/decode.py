"""Decode speed: phikit against transformers' generate (and llama.cpp when installed), in one process.

Random phi-1.5-shaped weights (the speed of a matrix product does not depend on its values), a 128-token prompt,
64 new tokens, greedy, batch 1 and 8. For each engine and weight format:
  prefill tok/s = batch * prompt_len / time(generate 1 token)
  decode  tok/s = batch * (new_tokens - 1) / (time(generate new_tokens) - time(generate 1 token))
Both engines are timed the same way, after a warm-up, the median of --repeats rounds taken in turns (each round
starting with the next engine); a ratio of two decode speeds timed in the same turns is the median of the rounds'
ratios (the engines of a round run seconds apart, while the host's speed drifts from round to round). Every format
is compared with transformers fp32 timed in its own turns (row transformers-fp32-beside-MODE), and batch 8
with batch 1 timed again in batch 8's turns (row phikit-MODE-batch1-beside-batch8), since the host's speed
drifts. llama.cpp, when llama-cpp-python is installed, runs our GGUF export in the turns of the phikit format of
equal bits (rows llama.cpp-TYPE, on the same prompts, every batch through its batch API, and its batch 1 again in
batch 8's turns). The memory-bandwidth floor is the time to read the weights
once per step at the read bandwidth measured before each round of the engines' turns (their median, in each row's
`bandwidth_gbs`: a host's memory speed can drift by a third within minutes); `floor_fraction` = floor time / step
time.
The int8/int4 agreement rate (greedy tokens equal to fp32 for the first 32 tokens, on a tiny model trained here
in a few seconds) is measured with --agreement.

    python benchmarks/decode.py                       # the full table (several minutes on 2 cores)
    python benchmarks/decode.py --modes int8 --batches 1 --skip-transformers
    python benchmarks/decode.py --preset cpu-small --modes fp32 --compile --llama-types ""   # a small model
The last line printed is JSON.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import threading
import time

import torch

from phikit import build_model, get_config
from phikit.inference.decoding import complete
from phikit.model import PhiForCausalLM
from phikit.inference import native
from phikit.inference.quant import MODES, Int4Linear, quantize_model
from phikit.tokenizer import build_phi_tokenizer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def read_bandwidth_gbs(device: str, x: torch.Tensor | None = None) -> float:
    """Sustained read bandwidth: the faster of summing a 1 GiB tensor and a 1 GiB matrix-vector product (what a
    decoding step does), best of 3 each. `x`: the 2**28 fp32 values to read, to reuse one allocation."""
    x = torch.ones(2**28, dtype=torch.float32, device=device) if x is None else x
    vec = torch.ones(2**14, dtype=torch.float32, device=device)
    best = float("inf")
    for fn in (x.sum, lambda: torch.mv(x.view(2**14, 2**14), vec)):
        for _ in range(3):
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            best = min(best, time.perf_counter() - start)
    return 2**30 / best / 1e9


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class PeakRSS:
    """Peak resident memory of this process while the block runs (polled), minus what it held before."""

    def __enter__(self):
        self.before = self.peak = self._rss()
        self.running = True
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def _poll(self):
        while self.running:
            self.peak = max(self.peak, self._rss())
            time.sleep(0.005)

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.extra = self.peak - self.before


def weight_bytes(model: torch.nn.Module, resident: bool = False) -> int:
    """Bytes of the matrices a decoding step reads; resident=True adds the copies only prompts read (int4's
    nibbles beside torch's packed copy, where the C++ kernels are missing), which take memory all the same."""
    prompt_only = {f"{name}.{buffer}" for name, m in model.named_modules()
                   if isinstance(m, Int4Linear) and not m.native for buffer in ("nibbles", "scales", "mins")}
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    return sum(t.numel() * t.element_size() for name, t in tensors
               if t.dim() > 1 and (resident or name not in prompt_only))


def to_transformers(model: PhiForCausalLM):
    """A transformers PhiForCausalLM sharing our weight tensors (no copy)."""
    import transformers
    hf_config = transformers.PhiConfig(**model.config.to_hf_dict())
    with torch.device("meta"):
        ref = transformers.PhiForCausalLM(hf_config)
    ref.load_state_dict(model.state_dict(), strict=False, assign=True)
    device = model.device
    ref.model.rotary_emb = type(ref.model.rotary_emb)(hf_config).to(device)
    return ref.eval()


class Timed:
    """One engine's timings: a warm-up (which also measures its extra peak memory), then rounds of
    (generate 1 token, generate new_tokens), keeping the median of each. Engines of one table row group run their
    rounds in turn, so that a noisy stretch of the machine slows all of them instead of one."""

    def __init__(self, name: str, fn, device: str) -> None:
        self.name, self.fn, self.device = name, fn, device
        self.times: dict[int, list[float]] = {}  # new tokens -> seconds of each round
        self.extra: int | None = None  # extra peak bytes, set by the warm-up

    @property
    def t1(self) -> float:
        return statistics.median(self.times[1])

    @property
    def tn(self) -> float:
        return statistics.median(t for n, ts in self.times.items() if n != 1 for t in ts)

    def round_steps(self, new_tokens: int) -> list[float]:
        """Each round's seconds per step: (its generate of new_tokens - its generate of 1) / (new_tokens - 1)."""
        return [(tn - t1) / (new_tokens - 1) for t1, tn in zip(self.times[1], self.times[new_tokens])]

    def warm_up(self) -> None:
        with PeakRSS() as mem:  # the warm-up counts: lazily made copies (packed weights) are memory the engine needs
            if self.device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            self.fn(2)  # allocator, kernels, lazy init
        self.extra = torch.cuda.max_memory_allocated() if self.device.startswith("cuda") else mem.extra

    def run_round(self, new_tokens: int) -> None:
        for n in (1, new_tokens):
            _sync(self.device)
            start = time.perf_counter()
            self.fn(n)
            _sync(self.device)
            self.times.setdefault(n, []).append(time.perf_counter() - start)


def time_interleaved(engines: list[Timed], new_tokens: int, repeats: int, device: str) -> float:
    """Rounds of the engines' turns, each round starting one engine later (the host runs the first turn after the
    bandwidth measurement measurably differently: 7% on a 2-core EPYC, identical engines A before B); returns the
    median read bandwidth, measured before each round."""
    for engine in engines:
        if engine.extra is None:
            engine.warm_up()
    values = torch.ones(2**28, dtype=torch.float32, device=device)
    bandwidths = []
    for turn in range(repeats):
        bandwidths.append(read_bandwidth_gbs(device, values))
        first = turn % len(engines)
        for engine in engines[first:] + engines[:first]:
            engine.run_round(new_tokens)
    return statistics.median(bandwidths)


def paired_speed_ratio(ours: list[float], our_batch: int, theirs: list[float], their_batch: int) -> float | None:
    """Decode speed of one engine over another's from their rounds' seconds per step in the same turns: the median
    of the rounds' ratios. The engines of a round run seconds apart, the rounds minutes apart, and a host's speed
    drifts between them (by a third within a minute): a ratio of two medians taken over different rounds carries
    that drift, a round's ratio mostly not. Rounds too noisy to time a step (<= 0 s) are left out."""
    ratios = [(our_batch / a) / (their_batch / b) for a, b in zip(ours, theirs) if a > 0 and b > 0]
    return round(statistics.median(ratios), 2) if ratios and len(ours) == len(theirs) else None


def result_row(engine: Timed, model, batch: int, prompt_len: int, new_tokens: int, bandwidth: float) -> dict:
    extra, cuda = engine.extra, engine.device.startswith("cuda")
    peak = extra if cuda else weight_bytes(model, resident=True) + extra
    return timing_row(engine, batch, prompt_len, new_tokens, weight_bytes(model), bandwidth,
                      peak_mem_mb=round(peak / 2**20))


def timing_row(engine: Timed, batch: int, prompt_len: int, new_tokens: int, wbytes: int, bandwidth: float,
               **extra) -> dict:
    """One engine's JSON row (also printed): speeds from its timings, and the fraction of the bandwidth floor for
    reading `wbytes` once per step."""
    decode_s = (engine.tn - engine.t1) / (new_tokens - 1)  # per step (one token per row)
    if decode_s <= 0:
        # The two timings are separate medians: with few new tokens the noise can exceed the steps. A negative
        # speed would be nonsense, so the decode figures are left out (null) and the ratios skip them.
        print(f"{engine.name}: {new_tokens} new tokens are too few to time a step apart from the prompt's pass; "
              "use more --new-tokens or --repeats", file=sys.stderr)
    timed = decode_s > 0
    row = {"engine": engine.name, "batch": batch, "bandwidth_gbs": round(bandwidth, 1),
           "prefill_tok_s": round(batch * prompt_len / engine.t1, 2),
           "decode_tok_s": round(batch / decode_s, 2) if timed else None,
           "ms_per_step": round(decode_s * 1000, 2) if timed else None, "end_to_end_s": round(engine.tn, 2),
           "weights_mb": round(wbytes / 2**20), **extra,
           "floor_fraction": round((wbytes / (bandwidth * 1e9)) / decode_s, 3) if timed else None}
    print(json.dumps(row), file=sys.stderr, flush=True)
    return row


@torch.inference_mode()
def finite_logits(model, ids: torch.Tensor) -> bool:
    """Whether the prompt's logits and one decoding step's are all finite (phi-2 in fp16 overflows q.k^T into NaN
    where attention scores are not kept in fp32)."""
    out = model(ids, use_cache=True, logits_to_keep=1)
    step = model(out.logits[:, -1].argmax(-1, keepdim=True), past_key_values=out.past_key_values, use_cache=True)
    return bool(torch.isfinite(out.logits).all() and torch.isfinite(step.logits).all())


def phikit_fn(model, tokenizer, prompts, compile: bool = False):
    return lambda n: complete(model, tokenizer, prompts, max_new_tokens=n, stop_token_ids=[], compile=compile)


def transformers_fn(ref, ids):
    mask = torch.ones_like(ids)
    return lambda n: ref.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)


EQUAL_BITS = {"fp32": "f32", "bf16": "bf16", "int8": "q8_0", "int4": "q4_0"}


class LlamaCpp:
    """llama.cpp through llama-cpp-python, running our GGUF export of `model` at one GGUF type, timed like the
    other engines (Timed). Each batch is decoded through llama.cpp's own batch API (llama_decode of one token per
    sequence per step, greedy by argmax over the logits it returns), one context per batch size; close() frees them
    and deletes the file."""

    def __init__(self, llama_cpp, model, tokenizer, gguf_type: str, args) -> None:
        import tempfile
        from phikit.inference.gguf_export import export_gguf
        self.lib, self.args, self.gguf_type = llama_cpp, args, gguf_type
        self.tmp = tempfile.TemporaryDirectory()
        self.path = export_gguf(model, tokenizer, os.path.join(self.tmp.name, f"m-{gguf_type}.gguf"), dtype=gguf_type)
        self.llm = llama_cpp.Llama(str(self.path), n_ctx=8, n_threads=args.threads, verbose=False)  # the weights
        self.contexts: list = []
        self.tokens: list[list[int]] = []

    def timed(self, prompts: list[list[int]], name: str | None = None) -> Timed:
        """An engine that decodes `prompts` (one sequence each, equal lengths) together."""
        import ctypes
        import numpy as np
        lib, args, batch = self.lib, self.args, len(prompts)
        params = lib.llama_context_default_params()
        params.n_ctx = batch * -(-(args.prompt_len + args.new_tokens + 8) // 256) * 256  # llama.cpp's granularity
        params.n_batch = params.n_ubatch = max(batch * args.prompt_len, 512)
        params.n_seq_max = batch
        params.n_threads = params.n_threads_batch = args.threads
        ctx = lib.llama_init_from_model(self.llm.model, params)
        if not ctx:
            raise RuntimeError(f"llama.cpp could not make a context for {batch} sequences")
        self.contexts.append(ctx)
        n_vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(self.llm.model))
        tokens = lib.llama_batch_init(params.n_batch, 0, 1)

        def decode(entries: list[tuple[int, int, int, bool]]) -> None:  # (token, position, sequence, logits wanted)
            tokens.n_tokens = len(entries)
            for i, (token, pos, seq, wanted) in enumerate(entries):
                tokens.token[i], tokens.pos[i], tokens.n_seq_id[i], tokens.logits[i] = token, pos, 1, wanted
                tokens.seq_id[i][0] = seq
            if lib.llama_decode(ctx, tokens) != 0:
                raise RuntimeError("llama_decode failed")

        def next_tokens(last: list[int]) -> list[int]:  # greedy, from the logits of the last batch's entries `last`
            return [int(np.ctypeslib.as_array(ctypes.cast(lib.llama_get_logits_ith(ctx, i), ctypes.POINTER(
                ctypes.c_float)), shape=(n_vocab,)).argmax()) for i in last]

        def fn(n: int) -> None:
            lib.llama_memory_clear(lib.llama_get_memory(ctx), True)
            decode([(t, pos, s, pos == len(p) - 1) for s, p in enumerate(prompts) for pos, t in enumerate(p)])
            last = list(itertools.accumulate(len(p) for p in prompts))
            last = [i - 1 for i in last]  # each prompt's last token
            chosen = [[] for _ in prompts]
            for step in range(n - 1):
                new = next_tokens(last)
                decode([(t, len(prompts[s]) + step, s, True) for s, t in enumerate(new)])
                last = list(range(batch))
                for s, t in enumerate(new):
                    chosen[s].append(t)
            self.tokens = chosen  # the greedy tokens of the last call (the tests compare them), the n-th not taken
        return Timed(name or f"llama.cpp-{self.gguf_type}", fn, "cpu")

    def row(self, timed: Timed, batch: int, bandwidth: float) -> dict:
        return timing_row(timed, batch, self.args.prompt_len, self.args.new_tokens, os.path.getsize(self.path),
                          bandwidth)

    def close(self) -> None:
        for ctx in self.contexts:
            self.lib.llama_free(ctx)
        self.llm.close()
        self.tmp.cleanup()


def import_llama_cpp():
    try:
        import llama_cpp
        return llama_cpp
    except ImportError:
        print("llama-cpp-python is not installed: llama.cpp rows skipped", file=sys.stderr)
        return None


def agreement(modes: list[str], prompts_n: int = 32, tokens: int = 32) -> dict:
    """Train a tiny model on a small corpus for a few seconds, then count prompts whose first `tokens` greedy
    tokens are identical in fp32 and in each quantized mode."""
    from phikit.tokenizer import train_bpe
    torch.manual_seed(0)
    words = ("the cat sat on a mat and the dog ran to the park while a bird sang in the tall green tree "
             "numbers one two three four five add them up to get the total sum of all the values").split()
    gen = torch.Generator().manual_seed(0)
    texts = [" ".join(words[int(i)] for i in torch.randint(0, len(words), (40,), generator=gen)) for _ in range(400)]
    texts += [" ".join(words[j % len(words)] for j in range(k, k + 40)) for k in range(200)]
    tok = train_bpe(texts, vocab_size=400)
    config = get_config("tiny", vocab_size=512, hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                        num_attention_heads=2, max_position_embeddings=128, tokenizer_vocab_size=len(tok),
                        eos_token_id=tok.eos_token_id)
    model = build_model(config, seed=0)
    data = torch.tensor([i for t in texts for i in tok.encode(t) + [tok.eos_token_id]])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(150):
        starts = torch.randint(0, len(data) - 65, (16,), generator=gen)
        batch = torch.stack([data[s:s + 64] for s in starts])
        loss = model(batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    prompts = [" ".join(texts[i].split()[:6]) for i in range(0, 600, 600 // prompts_n)][:prompts_n]

    def greedy(m) -> list[list[int]]:  # one prompt at a time: batch-1 decoding is what the int8/int4 kernels serve
        return [complete(m, tok, [p], max_new_tokens=tokens, stop_token_ids=[])[0].token_ids for p in prompts]

    ref = greedy(model)
    out = {"train_loss": round(float(loss.detach()), 3)}
    for mode in modes:
        q = PhiForCausalLM(config)
        q.load_state_dict(model.state_dict())
        quantize_model(q.eval(), mode)
        got = greedy(q)
        out[f"{mode}_agreement"] = sum(a == b for a, b in zip(ref, got)) / len(prompts)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="phi-1_5")
    p.add_argument("--device", default="cpu")
    p.add_argument("--modes", default=None, help="comma list of fp32,bf16,fp16,int8,int8-weight-only,int4 (default: fp32,bf16,int8,int4 "
                                                  "on the CPU, fp16,bf16,int8 on a GPU)")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2,
                   help="timed rounds per engine (median kept); the engines of a mode and batch take turns")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-transformers", action="store_true")
    p.add_argument("--transformers-batches", default="1,8", help="batches for which transformers is also timed")
    p.add_argument("--llama-types", default=None,
                   help="GGUF types llama.cpp runs (\"\" for none; default: those of the --modes); each runs in the "
                        "turns of the phikit mode of equal bits (f32: fp32, bf16: bf16, q8_0: int8, q4_0: int4) when "
                        "that mode runs, alone otherwise")
    p.add_argument("--agreement", action="store_true", help="measure int8/int4 greedy agreement with fp32")
    p.add_argument("--check-finite", action="store_true",
                   help="check each format's logits for NaN/inf on the prompt and a decoding step (exit 1 if not)")
    p.add_argument("--compile", action="store_true",
                   help="also time phikit with compile=True (rows phikit-MODE-compiled; compile time not counted)")
    p.add_argument("--smoke", action="store_true",
                   help="a tiny preset that finishes in seconds: checks that the benchmark runs (the tests run it)")
    args = p.parse_args()
    if args.smoke:
        args.preset, args.batches, args.prompt_len, args.new_tokens, args.repeats = "tiny", "1,2", 8, 4, 1
        args.skip_transformers, args.llama_types = True, ""
    if args.new_tokens < 2:  # decode speed is the time of tokens 2..N beyond the first
        p.error(f"--new-tokens must be >= 2, got {args.new_tokens}")
    if args.repeats < 1 or args.prompt_len < 1:
        p.error("--repeats and --prompt-len must be >= 1")
    torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    modes = (args.modes or ("fp16,bf16,int8" if cuda else "fp32,bf16,int8,int4")).split(",")
    if args.llama_types is None:
        args.llama_types = ",".join(EQUAL_BITS[m] for m in modes if m in EQUAL_BITS)
    args.llama_types = [t for t in args.llama_types.split(",") if t]  # "" skips llama.cpp
    unknown = [m for m in modes if m not in DTYPES and m not in MODES]
    if unknown:  # before the bandwidth test and the model, which take a while
        p.error(f"unknown mode(s) {', '.join(unknown)}: choose from {', '.join([*DTYPES, *MODES])}")
    batches = [int(b) for b in args.batches.split(",")]
    hf_batches = {int(b) for b in args.transformers_batches.split(",")}

    bandwidth = read_bandwidth_gbs(args.device)
    print(f"read bandwidth {bandwidth:.1f} GB/s, {args.threads} threads, torch {torch.__version__}", file=sys.stderr)
    llama_cpp = import_llama_cpp() if args.llama_types and not cuda else None
    kernels = None if cuda else (native.isa() if native.extension() is not None else "torch")  # built or loaded now
    if kernels:
        print(f"CPU kernels: {kernels}", file=sys.stderr)
    tokenizer = build_phi_tokenizer()
    config = get_config(args.preset)
    base = build_model(config, seed=0, device=args.device)  # fp32 master copy
    gen = torch.Generator().manual_seed(0)
    rows = []
    rounds: dict[tuple[str, int], tuple] = {}  # (engine, row batch) -> (its turns, its rounds' seconds per step)
    results = {"benchmark": "decode", "preset": args.preset, "device": args.device, "threads": args.threads,
               "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "bandwidth_gbs": round(bandwidth, 1),
               "cpu_kernels": kernels, "few_row_streams": native.few_row_streams() if kernels != "torch" else None}
    for mode in modes:
        if mode in DTYPES:
            model = base if mode == "fp32" else build_model(config, seed=None, meta=True)
            if mode != "fp32":
                model.load_state_dict({k: v.to(DTYPES[mode]) for k, v in base.state_dict().items()}, assign=True)
                model.make_buffers(args.device)
            native.move_to_huge_pages(model)  # where phikit.load places weights
        else:
            model = build_model(config, seed=None, meta=True)
            model.load_state_dict({k: v.to(torch.bfloat16) for k, v in base.state_dict().items()}, assign=True)
            model.make_buffers(args.device)
            quantize_model(model, mode)
        model.eval()
        if args.check_finite:
            ids = torch.randint(0, min(50000, config.vocab_size), (1, args.prompt_len), generator=gen)
            results.setdefault("finite", {})[mode] = finite_logits(model, ids.to(args.device))
        first_rows = None
        llama = None
        if llama_cpp and EQUAL_BITS.get(mode) in args.llama_types:
            # llama.cpp at the same bits per weight, in each batch's turns, on the same prompts
            llama = LlamaCpp(llama_cpp, base, tokenizer, EQUAL_BITS[mode], args)
        for b in batches:
            ids = torch.randint(0, min(50000, config.vocab_size), (b, args.prompt_len), generator=gen).to(args.device)
            engines = [Timed(f"phikit-{mode}", phikit_fn(model, tokenizer, ids.tolist()), args.device)]
            engines[0].warm_up()  # before compiling, so its peak memory counts what it makes (packed weights)
            if b > 1 and first_rows is not None:
                # batch 1 again, in this batch's turns: the batch ratio then does not depend on the host's drift
                engines.append(Timed(f"phikit-{mode}-batch1-beside-batch{b}", phikit_fn(model, tokenizer, first_rows),
                                     args.device))
            if b == 1:
                first_rows = ids.tolist()
            if args.compile:
                fn = phikit_fn(model, tokenizer, ids.tolist(), compile=True)
                start = time.perf_counter()
                fn(args.new_tokens)  # compiles (the cache capacity, so the graph, is that of the timed calls)
                print(f"compiled {mode} batch {b} in {time.perf_counter() - start:.0f}s", file=sys.stderr)
                engines.append(Timed(f"phikit-{mode}-compiled", fn, args.device))
            ref = base_ref = None
            if not args.skip_transformers and mode in DTYPES and b in hf_batches:
                ref = to_transformers(model)
                engines.append(Timed(f"transformers-{mode}", transformers_fn(ref, ids), args.device))
            llama_engines = {}  # llama.cpp's engines of this batch: engine -> its row's batch
            if llama:
                llama_engines[llama.timed(ids.tolist())] = b
                if b > 1 and first_rows is not None:
                    llama_engines[llama.timed(first_rows, f"llama.cpp-{llama.gguf_type}-batch1-beside-batch{b}")] = 1
                engines += list(llama_engines)
            if not args.skip_transformers and not cuda and mode != "fp32" and b == 1:
                # The targets compare every format with transformers fp32: time it in the same turns, so that the
                # ratio does not depend on how fast the host was when the fp32 rows ran.
                base_ref = to_transformers(base)
                engines.append(Timed(f"transformers-fp32-beside-{mode}", transformers_fn(base_ref, ids), args.device))
            turns_bandwidth = time_interleaved(engines, args.new_tokens, args.repeats, args.device)
            for e in engines:  # (engine, its row's batch) -> this mode and batch's turns, for the paired ratios
                row_batch = llama_engines.get(e, 1 if "batch1-beside" in e.name else b)
                rounds[(e.name, row_batch)] = ((mode, b), e.round_steps(args.new_tokens))
            rows += [result_row(e, base if e.name.startswith("transformers-fp32") else model,
                                1 if "batch1-beside" in e.name else b, args.prompt_len, args.new_tokens,
                                turns_bandwidth)
                     for e in engines if e not in llama_engines]
            rows += [llama.row(e, batch, turns_bandwidth) for e, batch in llama_engines.items()]
            del ref, base_ref, engines, llama_engines
        if llama:
            llama.close()
        if model is not base:
            del model
    ids = torch.randint(0, min(50000, config.vocab_size), (1, args.prompt_len), generator=gen)
    for gguf_type in args.llama_types if llama_cpp else []:  # types without a phikit mode of equal bits: alone
        if not any(EQUAL_BITS.get(m) == gguf_type for m in modes):
            llama = LlamaCpp(llama_cpp, base, tokenizer, gguf_type, args)
            engine = llama.timed(ids.tolist())
            rows.append(llama.row(engine, 1, time_interleaved([engine], args.new_tokens, args.repeats, args.device)))
            llama.close()
    results["rows"] = rows

    def get(engine, b, key):
        return next((r[key] for r in rows if r["engine"] == engine and r["batch"] == b), None)

    def decode_ratio(ours: tuple[str, int], theirs: tuple[str, int]) -> float | None:
        """Decode speed of engine row `ours` over `theirs` ((engine, batch)): paired round by round where they ran
        in the same turns (paired_speed_ratio), else the ratio of the rows' medians; none where a row has no
        decode speed (too few tokens to time a step)."""
        a, b = get(*ours, "decode_tok_s"), get(*theirs, "decode_tok_s")
        if not (a and b):
            return None
        if ours in rounds and theirs in rounds and rounds[ours][0] == rounds[theirs][0]:
            paired = paired_speed_ratio(rounds[ours][1], ours[1], rounds[theirs][1], theirs[1])
            if paired is not None:
                return paired
        return round(a / b, 2)

    ratios = {}
    ref_mode = "fp16" if cuda else "fp32"
    hf_pre = get(f"transformers-{ref_mode}", 1, "prefill_tok_s")
    for mode in modes:
        ours = (f"phikit-{mode}", 1)
        # the reference timed in this mode's turns when there is one, else the one of the fp32 rows
        hf = next(((e, 1) for e in (f"transformers-{ref_mode}-beside-{mode}", f"transformers-{ref_mode}")
                   if get(e, 1, "decode_tok_s")), None)
        if hf and (r := decode_ratio(ours, hf)):
            ratios[f"{mode}_decode_vs_transformers_{ref_mode}"] = r
        if get(f"transformers-{mode}", 1, "decode_tok_s") and get(*ours, "decode_tok_s"):
            ratios[f"{mode}_decode_vs_transformers_{mode}"] = decode_ratio(ours, (f"transformers-{mode}", 1))
            ratios[f"{mode}_prefill_vs_transformers_{mode}"] = round(
                get(f"phikit-{mode}", 1, "prefill_tok_s") / get(f"transformers-{mode}", 1, "prefill_tok_s"), 2)
            ratios[f"{mode}_end_to_end_vs_transformers_{mode}"] = round(
                get(f"transformers-{mode}", 1, "end_to_end_s") / get(f"phikit-{mode}", 1, "end_to_end_s"), 2)
        if 8 in batches:
            beside = f"phikit-{mode}-batch1-beside-batch8"
            if r := decode_ratio((f"phikit-{mode}", 8), (beside, 1) if get(beside, 1, "decode_tok_s") else ours):
                ratios[f"{mode}_batch8_vs_batch1"] = r
        if r := decode_ratio((f"phikit-{mode}-compiled", 1), ours):
            ratios[f"{mode}_compiled_decode_vs_eager"] = r
            if hf and (r := decode_ratio((f"phikit-{mode}-compiled", 1), hf)):
                ratios[f"{mode}_compiled_decode_vs_transformers_{ref_mode}"] = r
    for mode, gguf_type in EQUAL_BITS.items():  # our formats against llama.cpp's at the same bits per weight
        theirs = f"llama.cpp-{gguf_type}"
        if r := decode_ratio((f"phikit-{mode}", 1), (theirs, 1)):
            ratios[f"{mode}_decode_vs_llama_cpp_{gguf_type}"] = r
        if r := decode_ratio((f"phikit-{mode}", 8), (theirs, 8)):
            ratios[f"{mode}_batch8_decode_vs_llama_cpp_{gguf_type}"] = r
            beside = f"{theirs}-batch1-beside-batch8"
            if r := decode_ratio((theirs, 8), (beside, 1) if get(beside, 1, "decode_tok_s") else (theirs, 1)):
                ratios[f"llama_cpp_{gguf_type}_batch8_vs_batch1"] = r
    if hf_pre and get(f"phikit-{ref_mode}", 1, "prefill_tok_s"):
        ratios[f"{ref_mode}_prefill_vs_transformers_{ref_mode}"] = round(
            get(f"phikit-{ref_mode}", 1, "prefill_tok_s") / hf_pre, 2)
    results["ratios"] = ratios
    if args.agreement:
        results["agreement"] = agreement([m for m in modes if m in MODES] or list(MODES))
    print(json.dumps(results))
    if not all(results.get("finite", {}).values()):
        sys.exit(f"non-finite logits in {', '.join(m for m, ok in results['finite'].items() if not ok)}")


if __name__ == "__main__":
    main()
