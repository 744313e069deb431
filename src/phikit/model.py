"""The phi transformer in one file.

Per block one LayerNorm feeds attention and MLP in parallel: x = x + attn(ln(x)) + mlp(ln(x)).
Rotary embedding (NeoX rotate-half) on the first rotary_dim channels of each head only.
Module names equal transformers' PhiForCausalLM, so an HF-native state dict loads as is.
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as torch_module

from .config import PhiConfig
from .inference import native
from .inference.kv_cache import KVCache


@dataclass
class PhiOutput:
    logits: torch.Tensor
    past_key_values: KVCache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    loss: torch.Tensor | None = None

    def __getitem__(self, key: str):  # dict-style access, as transformers' outputs allow
        return getattr(self, key)


class RotaryEmbedding(nn.Module):
    def __init__(self, dim: int, base: float) -> None:
        super().__init__()
        self.dim, self.base = dim, base
        # on the default device (meta in a meta build), computed on the CPU: torch's meta arithmetic would import
        # its compiler stack (~1 s at start-up)
        self.register_buffer("inv_freq", self.frequencies().to(torch.empty(0).device), persistent=False)

    def frequencies(self) -> torch.Tensor:
        """The inverse frequencies, computed on the CPU (no checkpoint stores them: a buffer, not a weight)."""
        steps = torch.arange(0, self.dim, 2, dtype=torch.int64, device="cpu").float()
        return 1.0 / (self.base ** (steps / self.dim))

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # fp32 angles: large positions lose precision in half precision.
        freqs = position_ids[..., None].float() * self.inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_partial_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, T, D]; cos/sin: [B, T, rotary_dim]. Rotates the first rotary_dim channels only."""
    rd = cos.shape[-1]
    x_rot, x_pass = x[..., :rd], x[..., rd:]
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
    x_rot = x_rot * cos + rotate_half(x_rot) * sin
    return torch.cat((x_rot, x_pass), dim=-1)


def rotate_query_and_key(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """apply_partial_rotary on q and k. A CPU decoding step outside autograd rotates them in place on phikit's C++
    kernels, to the bit as torch would: one call where torch takes eight small operations per tensor and layer."""
    if (q.device.type == "cpu" and q.shape[2] == 1 and not torch.is_grad_enabled() and q.dtype == k.dtype
            and q.dtype in (torch.float32, torch.bfloat16) and cos.dtype == torch.float32
            and not torch.compiler.is_compiling()):
        ext = native.extension()
        if ext is not None:
            ext.rotary_(q, k, cos, sin)
            return q, k
    return apply_partial_rotary(q, cos, sin), apply_partial_rotary(k, cos, sin)


# How many compiled graphs of forward_static a process may hold (batch sizes x cache lengths x models).
STATIC_STEP_GRAPHS = 64


_upcast_buffers = threading.local()


def _as_fp32(x: torch.Tensor, slot: int) -> torch.Tensor:
    """x in fp32, written into a buffer this thread keeps (one per slot, grown as needed) rather than a fresh
    allocation: a fresh one page-faults on every write, which made a bf16 cache's upcast 4-7x slower than the copy
    itself (batch 8, 1000 cached tokens: 395 against 56 ms per step for the keys of 24 layers)."""
    if x.dtype == torch.float32 or torch.compiler.is_compiling():  # compiled graphs plan their own memory
        return x.float()
    buffers = _upcast_buffers.__dict__.setdefault("buffers", {})
    key = (slot, str(x.device))
    buf = buffers.get(key)
    if buf is None or buf.numel() < x.numel():
        with torch.inference_mode(False):  # never an inference tensor: a later no_grad call writes into it too
            buf = buffers[key] = torch.empty(x.numel(), device=x.device)
    return buf[:x.numel()].view(x.shape).copy_(x)


def single_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                           scale: float) -> torch.Tensor:
    """Attention of one query per row (a decoding step) in fp32: q [B, H, 1, D], k/v [B, H, L, D].

    On the CPU torch's fused attention kernel is built for long queries; at one query it takes 1.2x (fp32) to 3x
    (bf16) the time of these two small products and a softmax, and decoding calls it in every layer. Where phikit's
    C++ kernels are built, the whole of it is one call (`attention_step`) reading the cache where it lies;
    otherwise torch's products, scores taken as k @ q (each key row a contiguous dot product), 1.2x faster than
    q @ k^T over a cache's strided view."""
    ext = native.extension() if not torch.compiler.is_compiling() else None
    if (ext is not None and q.dtype in (torch.float32, torch.bfloat16) and k.dtype == v.dtype
            and k.dtype in (torch.float32, torch.bfloat16)
            and all(t.stride(3) == 1 and (t.shape[2] <= 1 or t.stride(2) == t.shape[3]) for t in (k, v))
            and (mask is None or mask.dtype == torch.bool and mask.dim() == 4 and mask.shape[2:] == (1, k.shape[2]))):
        return ext.attention_step(q, k, v, mask, scale, native.isa_code())
    k, v = _as_fp32(k, 0), _as_fp32(v, 1)
    scores = torch.matmul(k, q.float().transpose(-1, -2)).transpose(-1, -2) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return torch.matmul(scores.softmax(-1), v).to(q.dtype)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """phi's activation, GELU with the tanh approximation. At inference on the CPU, on phikit's C++ kernels once the
    process has them (generation, the server and eval load them): one call, 2-3x faster than torch's at a decoding
    step's few rows and at prompts, within 5e-7 of torch's in fp32 (cpu_kernels.cpp says how). Elsewhere, and with
    autograd on, torch's."""
    if x.device.type == "cpu" and not torch.is_grad_enabled() and not torch.compiler.is_compiling():
        ext = native.loaded()
        if ext is not None and x.dtype in (torch.float32, torch.bfloat16):
            return ext.gelu_tanh(x)
    return F.gelu(x, approximate="tanh")


class PhiAttention(nn.Module):
    def __init__(self, config: PhiConfig, layer_idx: int) -> None:
        super().__init__()
        d = config.hidden_size
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.dropout = config.attention_dropout
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.dense = nn.Linear(d, d)
        # Quantized models (phikit.inference.quant) replace q/k/v by this one [3d, d] projection: one kernel call per step
        # instead of three, which decoding notices. The checkpoint layout keeps the three.
        self.qkv_proj: nn.Module | None = None

    def fuse_qkv(self, make) -> tuple[nn.Linear, ...]:
        """Replace q, k and v by one projection, `make(fused)` of their [3d, d] nn.Linear (a quantized layer; exact
        when its scales are per output channel or group). Returns the three projections replaced, or nothing when
        they are not linear layers (an adapter wraps them: fusing would drop it)."""
        parts = (self.q_proj, self.k_proj, self.v_proj)
        if not all(isinstance(p, nn.Linear) for p in parts):
            return ()
        fused = nn.Linear(parts[0].in_features, sum(p.out_features for p in parts), device="meta")
        fused.weight = nn.Parameter(torch.cat([p.weight for p in parts]), requires_grad=False)
        fused.bias = nn.Parameter(torch.cat([p.bias for p in parts]), requires_grad=False)
        self.qkv_proj = make(fused)
        del self.q_proj, self.k_proj, self.v_proj
        return parts

    def forward(self, x, cos, sin, mask, cache: KVCache | None, output_attentions: bool):
        b, t, _ = x.shape
        if self.qkv_proj is not None:
            qkv = self.qkv_proj(x).view(b, t, 3, self.num_heads, self.head_dim)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        else:
            shape = (b, t, self.num_heads, self.head_dim)
            q = self.q_proj(x).view(shape).transpose(1, 2)
            k = self.k_proj(x).view(shape).transpose(1, 2)
            v = self.v_proj(x).view(shape).transpose(1, 2)
        q, k = rotate_query_and_key(q, k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        scale = 1.0 / math.sqrt(self.head_dim)
        dropout = self.dropout if self.training else 0.0
        one_query = q.device.type == "cpu" and q.shape[2] == 1 and dropout == 0.0 and not output_attentions
        if k.dtype != q.dtype and not one_query:  # a cache kept in another dtype; one query reads it as it lies
            k, v = k.to(q.dtype), v.to(q.dtype)
        # mask None means plain causal attention; with a single new token it sees every cached key.
        causal = mask is None and q.shape[2] > 1
        if output_attentions:
            # Eager path; scores in fp32 always (phi-2 overflows q.k^T in fp16).
            scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
            probs = F.softmax(scores, dim=-1)
            probs = F.dropout(probs, p=dropout, training=self.training)
            out = torch.matmul(probs.to(v.dtype), v)
        else:
            probs = None
            if one_query:
                out = single_query_attention(q, k, v, mask, scale)
            elif q.dtype == torch.float16 and q.device.type != "cuda":
                # CPU fp16 SDPA runs the math kernel in fp16: upcast so scores cannot overflow.
                out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                                     dropout_p=dropout, scale=scale, is_causal=causal).to(q.dtype)
            else:
                # Fused CUDA kernels accumulate scores in fp32, which avoids the fp16 overflow.
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scale,
                                                     is_causal=causal)
        out = out.transpose(1, 2).reshape(b, t, -1)
        return self.dense(out), probs


class PhiMLP(nn.Module):
    def __init__(self, config: PhiConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(gelu_tanh(self.fc1(x)))


# Whether decoding steps on the CPU run each decoder layer as one call of phikit's C++ kernels (native_layer_step);
# False runs the modules one by one (what that call is compared with).
NATIVE_LAYER_STEPS = True


def native_layer_step(layer: "PhiDecoderLayer", x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      mask: torch.Tensor | None, cache: KVCache) -> torch.Tensor | None:
    """One decoder layer of a CPU decoding step (one new token per sequence) as one call of the C++ kernels, or
    None where it cannot be: the kernels not loaded, a linear layer they cannot read (an adapter, no bias), hooks on
    a module (they would not run), another dtype, a static cache. The modules' path takes ~20 small torch
    operations around the products per layer, each slow after the weights have streamed through the caches: 9-12 ms
    of a 90 ms phi-1.5 step in bf16. Results equal the modules' to the bit but for the LayerNorm (another summation
    order, within an ulp)."""
    ext = native.loaded()
    if (ext is None or not NATIVE_LAYER_STEPS or x.device.type != "cpu" or cache.write_index is not None
            or x.dtype not in (torch.float32, torch.bfloat16) or torch.compiler.is_compiling()
            or _global_hooks()):
        return None
    attn, mlp, ln = layer.self_attn, layer.mlp, layer.input_layernorm
    projections = (attn.qkv_proj,) if attn.qkv_proj is not None else (attn.q_proj, attn.k_proj, attn.v_proj)
    linears = (*projections, attn.dense, mlp.fc1, mlp.fc2)
    for m in (ln, attn, mlp, *linears):
        if m._forward_hooks or m._forward_pre_hooks:
            return None
    operands = []
    for m in linears:
        given = getattr(m, "kernel_operands", None)
        parts = given(x.dtype) if given is not None else None
        if parts is None:
            return None
        operands.append(parts)
    if ln.weight is None or ln.bias is None or ln.weight.dtype != x.dtype:
        return None
    i, start = attn.layer_idx, cache.length
    keys, values = cache.keys[i], cache.values[i]
    if keys is None or keys.shape[2] <= start:
        keys, values, start = cache.reserve(i, x.new_empty(x.shape[0], attn.num_heads, 1, attn.head_dim))
    if (keys.dtype not in (torch.float32, torch.bfloat16)
            or not (keys.is_contiguous() and values.is_contiguous() and cos.is_contiguous())
            or cos.dim() != 3 or cos.shape[1] != 1 or (mask is not None and (
                mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1:] != (1, 1, start + 1)))):
        return None
    return ext.layer_step(x.contiguous(), ln.weight, ln.bias, ln.eps, operands, keys, values, start, cos, sin, mask,
                          native.isa_code())


def _global_hooks() -> bool:
    """Whether forward hooks are registered for every module (nn.modules.module.register_module_forward_hook)."""
    return bool(torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks)


class PhiDecoderLayer(nn.Module):
    def __init__(self, config: PhiConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = PhiAttention(config, layer_idx)
        self.mlp = PhiMLP(config)
        self.resid_dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, x, cos, sin, mask, cache, output_attentions):
        if x.shape[1] == 1 and cache is not None and not (output_attentions or self.training
                                                          or torch.is_grad_enabled()):
            out = native_layer_step(self, x, cos, sin, mask, cache)
            if out is not None:
                return out, None
        h = self.input_layernorm(x)
        attn_out, probs = self.self_attn(h, cos, sin, mask, cache, output_attentions)
        mlp_out = self.mlp(h)
        if self.training:  # two module calls a layer that inference does not need
            attn_out, mlp_out = self.resid_dropout(attn_out), self.resid_dropout(mlp_out)
        return x + attn_out + mlp_out, probs


class PhiModel(nn.Module):
    def __init__(self, config: PhiConfig) -> None:
        super().__init__()
        if torch.empty(0).device.type == "meta":  # a meta build: no random init (its meta normal_ costs ~1 s of imports)
            self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size,
                                             _weight=torch.empty(config.vocab_size, config.hidden_size))
        else:
            self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embed_dropout = nn.Dropout(config.embd_pdrop)
        self.layers = nn.ModuleList(PhiDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.rotary_dim, config.rope_theta)


def build_attention_mask(attention_mask: torch.Tensor | None, b: int, t: int, past: int,
                         device: torch.device, segment_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean [B, 1, T, past+T] mask: causal, minus padded keys, minus keys of other packed segments.

    A query row with no visible key (a left-pad position) is let see itself, so softmax stays finite;
    its output is never used.
    """
    total = past + t
    q_pos = torch.arange(past, total, device=device)[:, None]
    k_pos = torch.arange(total, device=device)[None, :]
    mask = (k_pos <= q_pos)[None, None].expand(b, 1, t, total)
    if attention_mask is not None:  # its shape was checked by forward
        mask = mask & attention_mask.bool()[:, None, None, :]
    if segment_ids is not None:
        if past:
            raise ValueError("segment_ids (packed sequences) cannot be combined with a KV cache")
        mask = mask & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
    diag = (k_pos == q_pos)[None, None]
    return mask | (diag & ~mask.any(-1, keepdim=True))


class PhiForCausalLM(nn.Module):
    def __init__(self, config: PhiConfig) -> None:
        super().__init__()
        self.config = config
        self.model = PhiModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size)

    # --- helpers ---
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    @property
    def cache_dtype(self) -> torch.dtype:
        """The dtype of the keys and values a KV cache keeps: the model's, except where quantization says otherwise
        (an int8 model on the CPU computes in fp32 and caches in bf16, see quant.quantize_model)."""
        return getattr(self, "kv_cache_dtype", None) or self.dtype

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def decoder_blocks(self) -> nn.ModuleList:
        """The decoder blocks, in order (what activation checkpointing, compile and FSDP work per)."""
        return self.model.layers

    # --- lifecycle: initialization, meta-device builds, vocabulary growth ---
    @torch.no_grad()
    def init_weights(self, seed: int | None = None, generator: torch.Generator | None = None) -> None:
        """Normal(0, initializer_range) weights, zero biases, unit LayerNorms (as transformers' PhiPreTrainedModel).

        Numbers are drawn in fp32 on the generator's device: with `seed`, on the CPU, so a seed gives the same model
        on every device and dtype; a `generator` on the weights' device spares the copy (each process of a sharded
        model draws its own shard)."""
        if generator is None and seed is not None:
            generator = torch.Generator(device="cpu").manual_seed(seed)
        device = generator.device if generator is not None else "cpu"
        std = self.config.initializer_range
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                w = m.weight.to_local() if hasattr(m.weight, "to_local") else m.weight  # a shard of a DTensor
                w.copy_(torch.empty(w.shape, dtype=torch.float32, device=device).normal_(0.0, std, generator=generator))
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.LayerNorm):
                m.weight.fill_(1.0)
                m.bias.zero_()

    def make_buffers(self, device: str | torch.device) -> None:
        """Make the buffers no checkpoint holds (the rotary frequencies) on `device`: after a build on the meta
        device, where loading or materializing gives the weights only."""
        self.model.rotary_emb.inv_freq = self.model.rotary_emb.frequencies().to(device)

    def materialize(self, device: str | torch.device, seed: int) -> None:
        """Allocate a model built on the meta device on `device` and initialize it there (init_weights with a
        generator seeded by `seed`; a sharded model's processes pass each their own seed)."""
        self.to_empty(device=device)
        self.init_weights(generator=torch.Generator(device=device).manual_seed(seed))
        self.make_buffers(device)

    @torch.no_grad()
    def resize_token_embeddings(self, new_rows: int) -> None:
        """Grow the embedding and lm_head to `new_rows` rows, keeping the existing ones; the new rows start at the
        mean of the old ones."""
        old = self.config.vocab_size
        if new_rows <= old:
            return
        embed, head = self.model.embed_tokens, self.lm_head
        new_embed = nn.Embedding(new_rows, embed.embedding_dim, device=embed.weight.device, dtype=embed.weight.dtype)
        new_head = nn.Linear(head.in_features, new_rows, device=head.weight.device, dtype=head.weight.dtype)
        new_embed.weight[:old] = embed.weight
        new_embed.weight[old:] = embed.weight.mean(0, keepdim=True)
        new_head.weight[:old] = head.weight
        new_head.weight[old:] = head.weight.mean(0, keepdim=True)
        new_head.bias[:old] = head.bias
        new_head.bias[old:] = head.bias.mean()
        self.model.embed_tokens, self.lm_head = new_embed, new_head
        self.config.vocab_size = new_rows

    def _check_inputs(self, input_ids, inputs_embeds, attention_mask, past_key_values, labels, logits_to_keep) -> None:
        """One-line errors for inputs that would otherwise fail deep inside torch with a message naming neither."""
        cfg = self.config
        if input_ids is not None:
            if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
                raise ValueError(f"input_ids must be int64 token ids of shape [batch, seq] or [seq], got "
                                 f"{str(input_ids.dtype).removeprefix('torch.')} {tuple(input_ids.shape)}")
            outside = (input_ids < 0) | (input_ids >= cfg.vocab_size)
            if outside.any():  # one device sync per call; the details only on failure
                raise ValueError(f"token id {int(input_ids[outside][0])} is outside the embedding "
                                 f"({cfg.vocab_size} rows): tokenizer and model do not match")
            shape = tuple(input_ids.shape)
        else:
            if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != cfg.hidden_size:
                raise ValueError(f"inputs_embeds has shape {tuple(inputs_embeds.shape)}, expected "
                                 f"[batch, seq, {cfg.hidden_size}]")
            if inputs_embeds.dtype != self.dtype and not torch.is_autocast_enabled(inputs_embeds.device.type):
                raise ValueError(f"inputs_embeds are {inputs_embeds.dtype} but the model is {self.dtype}: "
                                 "pass inputs_embeds.to(model.dtype)")
            shape = tuple(inputs_embeds.shape[:2])
        if 0 in shape:
            raise ValueError(f"empty input of shape {shape}: pass at least one sequence of at least one token")
        if past_key_values is not None and not isinstance(past_key_values, KVCache):
            raise ValueError(f"past_key_values is a {type(past_key_values).__name__}: pass the KVCache a previous "
                             "call returned (use_cache=True), or None")
        past = past_key_values.length if past_key_values is not None else 0
        if attention_mask is not None and tuple(attention_mask.shape) != (shape[0], past + shape[1]):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected "
                             f"({shape[0]}, {past + shape[1]}) covering the cached and the new tokens")
        if labels is not None:
            if tuple(labels.shape) != shape:
                raise ValueError(f"labels have shape {tuple(labels.shape)}, expected {shape} like the input "
                                 "(-100 marks positions without a target)")
            if not (isinstance(logits_to_keep, int) and logits_to_keep == 0):
                raise ValueError("labels need the logits of every position: drop logits_to_keep to get a loss")
        if isinstance(logits_to_keep, int) and logits_to_keep < 0:
            raise ValueError(f"logits_to_keep is {logits_to_keep}: pass the number of last positions to keep "
                             "(0 keeps all) or a tensor of positions")

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
        use_cache: bool = False,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        labels: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
    ) -> PhiOutput:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if input_ids is not None and input_ids.dim() == 1:  # one unbatched sequence: so are its mask and labels
            input_ids = input_ids[None]
            attention_mask = attention_mask[None] if attention_mask is not None and attention_mask.dim() == 1 \
                else attention_mask
            labels = labels[None] if labels is not None and labels.dim() == 1 else labels
        self._check_inputs(input_ids, inputs_embeds, attention_mask, past_key_values, labels, logits_to_keep)
        if inputs_embeds is None:
            inputs_embeds = self.model.embed_tokens(input_ids)
        b, t, _ = inputs_embeds.shape
        cache = past_key_values
        if cache is None and use_cache:
            cache = KVCache(self.config.num_hidden_layers, self.cache_dtype)
        past = cache.length if cache is not None else 0
        if past + t > self.config.max_position_embeddings:
            raise ValueError(f"sequence of {past + t} tokens exceeds the context of "
                             f"{self.config.max_position_embeddings}: shorten the input")
        device = inputs_embeds.device
        if position_ids is None:
            if attention_mask is not None:
                # Left padding: positions count real tokens only.
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -t:]
            else:
                position_ids = torch.arange(past, past + t, device=device)[None].expand(b, t)
        elif position_ids.dim() == 1 and position_ids.shape[0] == t:
            position_ids = position_ids[None].expand(b, t)
        if position_ids.shape not in ((b, t), (1, t)):
            raise ValueError(f"position_ids has shape {tuple(position_ids.shape)}, expected ({b}, {t}) or ({t},): "
                             "one position per new token")
        cos, sin = self.model.rotary_emb(position_ids)
        if attention_mask is None and segment_ids is None and not output_attentions and (t == 1 or past == 0):
            mask = None  # plain causal (or a single query seeing everything): lets SDPA pick its fastest kernel
        else:
            mask = build_attention_mask(attention_mask, b, t, past, device, segment_ids)

        x = self.model.embed_dropout(inputs_embeds)
        all_hidden, all_attn = [], []
        for layer in self.model.layers:
            if output_hidden_states:
                all_hidden.append(x)
            x, probs = layer(x, cos, sin, mask, cache, output_attentions)
            if output_attentions:
                all_attn.append(probs)
        x = self.model.final_layernorm(x)
        if output_hidden_states:
            all_hidden.append(x)
        if cache is not None:
            cache.advance(t)
        if isinstance(logits_to_keep, torch.Tensor):  # positions to keep, as transformers allows
            x = x[:, logits_to_keep]
        elif logits_to_keep:
            x = x[:, -logits_to_keep:]
        logits = self.lm_head(x)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return PhiOutput(
            logits=logits,
            past_key_values=cache if use_cache or past_key_values is not None else None,
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
            attentions=tuple(all_attn) if output_attentions else None,
            loss=loss,
        )

    def forward_static(self, input_ids: torch.Tensor, position_ids: torch.Tensor, key_mask: torch.Tensor,
                       cache: KVCache) -> torch.Tensor:
        """One decoding step with fixed shapes, for torch.compile: input_ids and position_ids [B, T], the new
        keys/values written at cache.write_index (T positions) of a preallocated cache, attention over the whole
        cache under key_mask [B, T, capacity] (True: may attend). Returns the last position's logits [B, vocab].
        No input checks, no cache bookkeeping: the caller (generate's compiled path) owns both."""
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.model.rotary_emb(position_ids)
        for layer in self.model.layers:
            x, _ = layer(x, cos, sin, key_mask[:, None], cache, False)
        return self.lm_head(self.model.final_layernorm(x[:, -1]))

    def compile_forward_static(self, dynamic: bool = False, mode: str | None = None):
        """torch.compile of forward_static (fullgraph; `mode` as torch.compile's, e.g. "reduce-overhead" for CUDA
        graphs, which then need the cache's tensors at fixed addresses). Torch stops compiling a function after
        `recompile_limit` graphs (8), counted over every model in the process, since they share forward_static's
        code: a few batch sizes and lengths of a few models reach that, so calls raise the limit to
        STATIC_STEP_GRAPHS (a setting of the calling thread, hence at each call)."""
        compiled = torch.compile(self.forward_static, dynamic=dynamic, fullgraph=True, mode=mode)

        def step(*args):
            if torch._dynamo.config.recompile_limit < STATIC_STEP_GRAPHS:
                torch._dynamo.config.recompile_limit = STATIC_STEP_GRAPHS
            return compiled(*args)
        return step


def decoder_block_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The parameters of every decoder block inside `module`, however it is wrapped (DDP, FSDP, compile, peft)."""
    return [p for m in module.modules() if isinstance(m, PhiDecoderLayer) for p in m.parameters()]


def build_model(config: PhiConfig, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                seed: int | None = 0, meta: bool = False) -> PhiForCausalLM:
    """A freshly initialized model (or an uninitialized one on the meta device, to be loaded or sharded)."""
    if meta:
        with torch.device("meta"):
            return PhiForCausalLM(config)
    model = PhiForCausalLM(config)
    model.init_weights(seed)
    return model.to(device=device, dtype=dtype)
