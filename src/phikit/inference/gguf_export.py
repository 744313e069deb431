"""Export a phikit model to GGUF (llama.cpp's "phi2" architecture), with the `gguf` package.

Tensor names are llama.cpp's for phi2 (checkpoint.gguf_name, so llama.cpp finds them); the tokenizer is written as a
GPT-2 byte-level BPE ("gpt2" model, "phi-2" pre-tokenizer) with its merges, and the embedding's padding rows get
unused placeholder tokens so the vocabulary matches the embedding. llama.cpp samples over every row, so those rows
also get an output bias of -1e9: like phikit, it then never produces a token the tokenizer cannot decode.
2-D weights take the chosen type; LayerNorms and biases stay f32, as llama.cpp's own converter writes them.

    export_gguf(model, tokenizer, "phi-1_5-q8_0.gguf", dtype="q8_0")
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import gguf
import numpy as np
import torch

from ..checkpoint import OUTPUT_BIAS, gguf_name
from ..files import check_output, staged_file
from ..model import PhiForCausalLM
from ..progress import tqdm
from ..tokenizer import Tokenizer

QTYPES = {
    "f32": gguf.GGMLQuantizationType.F32, "fp32": gguf.GGMLQuantizationType.F32,
    "f16": gguf.GGMLQuantizationType.F16, "fp16": gguf.GGMLQuantizationType.F16,
    "bf16": gguf.GGMLQuantizationType.BF16,
    "q8_0": gguf.GGMLQuantizationType.Q8_0,
    "q4_0": gguf.GGMLQuantizationType.Q4_0,
}
FILE_TYPES = {
    gguf.GGMLQuantizationType.F32: gguf.LlamaFileType.ALL_F32,
    gguf.GGMLQuantizationType.F16: gguf.LlamaFileType.MOSTLY_F16,
    gguf.GGMLQuantizationType.BF16: gguf.LlamaFileType.MOSTLY_BF16,
    gguf.GGMLQuantizationType.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0,
    gguf.GGMLQuantizationType.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0,
}
PADDING_LOGIT_BIAS = -1e9  # finite, so no sampler meets inf - inf; exp() of it is 0 in f32


def _vocab(tokenizer: Tokenizer, rows: int) -> tuple[list[str], list[int], list[str]]:
    """Tokens in id order, their GGUF token types, and the BPE merges."""
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
    added = tokenizer.backend.get_added_tokens_decoder()
    by_id = {i: t for t, i in vocab.items()}
    tokens, types = [], []
    for i in range(rows):
        if i in added:
            tokens.append(added[i].content)
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        elif i in by_id:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
        else:  # embedding rows past the tokenizer: never produced
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    model = json.loads(tokenizer.backend.to_str())["model"]
    if model.get("type") != "BPE":
        raise ValueError(f"GGUF export needs a BPE tokenizer, this one is {model.get('type')!r}")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return tokens, types, merges


def export_gguf(model: PhiForCausalLM, tokenizer: Tokenizer, path: str | os.PathLike, dtype: str = "fp16") -> Path:
    """Write `model` and `tokenizer` as one GGUF file llama.cpp can run; dtype: f32, f16, bf16, q8_0 or q4_0."""
    if getattr(model, "quantized", None):
        raise ValueError("cannot export a model quantized in memory: load the original weights and pick "
                         "dtype='q8_0' or 'q4_0' for a quantized GGUF")
    if dtype not in QTYPES:
        raise ValueError(f"unknown GGUF dtype {dtype!r}: choose one of {', '.join(QTYPES)}")
    qtype = QTYPES[dtype]
    # q8_0 and q4_0 quantize each row in blocks of 32 values; checked before writing anything
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    for name, tensor in model.state_dict().items():
        if tensor.ndim == 2 and tensor.shape[-1] % block:
            raise ValueError(f"GGUF {dtype} stores weights in blocks of {block} values, but {name} has rows of "
                             f"{tensor.shape[-1]}: export this model with dtype f16, bf16 or f32")
    path = Path(path)
    if path.suffix != ".gguf":
        raise ValueError(f"GGUF output {path} should end in .gguf")
    check_output(path, "gguf")
    cfg = model.config
    arch = gguf.MODEL_ARCH.PHI2

    with staged_file(path, "gguf") as tmp:
        writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[arch])
        writer.add_name(path.stem)
        writer.add_context_length(cfg.max_position_embeddings)
        writer.add_embedding_length(cfg.hidden_size)
        writer.add_feed_forward_length(cfg.intermediate_size)
        writer.add_block_count(cfg.num_hidden_layers)
        writer.add_head_count(cfg.num_attention_heads)
        writer.add_head_count_kv(cfg.num_attention_heads)
        writer.add_layer_norm_eps(cfg.layer_norm_eps)
        writer.add_rope_dimension_count(cfg.rotary_dim)
        writer.add_rope_freq_base(cfg.rope_theta)
        writer.add_file_type(FILE_TYPES[qtype])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

        tokens, types, merges = _vocab(tokenizer, cfg.vocab_size)
        unused = np.array([t == gguf.TokenType.UNUSED for t in types])
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("phi-2")
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(merges)
        writer.add_bos_token_id(tokenizer.bos_token_id)
        writer.add_eos_token_id(tokenizer.eos_token_id)
        writer.add_unk_token_id(tokenizer.eos_token_id)
        writer.add_add_bos_token(False)
        if tokenizer.chat_template:
            writer.add_chat_template(tokenizer.chat_template)

        for name, tensor in tqdm(model.state_dict().items(), desc=f"gguf {dtype}", unit="tensor"):
            gguf_key = gguf_name(name)
            if gguf_key is None:
                raise ValueError(f"no GGUF name for tensor {name}: is this a phi model?")
            data = tensor.detach().to("cpu", torch.float32).numpy()
            if name == OUTPUT_BIAS:
                data = data.copy()
                data[unused] = PADDING_LOGIT_BIAS
            if data.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
                writer.add_tensor(gguf_key, data)
            elif qtype == gguf.GGMLQuantizationType.F16:
                writer.add_tensor(gguf_key, data.astype(np.float16))
            else:
                writer.add_tensor(gguf_key, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return path
