"""Load and save phi checkpoints. The only module that knows weight names.

Reads three layouts (detected from the weight names): HF-native (transformers >= 4.37), phi-msft (late 2023) and
mixformer-sequential (the first phi-1 / phi-1.5 release). Writes the HF-native layout, which
`transformers.PhiForCausalLM.from_pretrained` loads without trust_remote_code. Weights are read from safetensors,
or from PyTorch .bin files through `torch.load(weights_only=True)` only; checkpoint code is never run.
"""
from __future__ import annotations

import ctypes
import json
import math
import mmap
import os
import pickle
import re
import warnings
import weakref
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import PhiConfig
from .files import check_output, staged_dir
from .inference.native import empty_weights
from .model import PhiForCausalLM
from .tokenizer import Tokenizer, build_phi_tokenizer

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16, "half": torch.float16}
# The modules LoRA adapts in every block (peft matches these name endings): attention projections and the MLP.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2")
TOKEN_ROW_MODULES = ("embed_tokens", "lm_head")  # one row per token: the rows new tokens train
OUTPUT_BIAS = "lm_head.bias"
# llama.cpp's names for ours in GGUF files (its "phi2" architecture); those of a block take its index.
_GGUF_NAMES = {"model.embed_tokens": "token_embd", "model.final_layernorm": "output_norm", "lm_head": "output"}
_GGUF_BLOCK_NAMES = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                     "self_attn.v_proj": "attn_v", "self_attn.dense": "attn_output", "mlp.fc1": "ffn_up",
                     "mlp.fc2": "ffn_down"}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read as a phi model; the message names what is wrong and the fix."""


# ---------------------------------------------------------------- locating files
def resolve_checkpoint(path_or_repo_id: str | os.PathLike) -> Path:
    """A local directory, or a Hugging Face repo id from the local HF cache (downloaded when online)."""
    path = Path(path_or_repo_id).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file: pass the checkpoint directory that holds config.json")
    text = str(path_or_repo_id)
    if not re.fullmatch(r"\w[\w.-]*/[\w.-]+", text):  # ./x, ../x and /x are paths, never repo ids
        raise FileNotFoundError(f"checkpoint directory {text} does not exist: pass a directory or an org/name repo id")
    from huggingface_hub import snapshot_download
    patterns = ["*.json", "*.safetensors", "*.txt"]
    try:
        return Path(snapshot_download(text, allow_patterns=patterns, local_files_only=True))
    except Exception:
        pass
    try:  # not cached: download (works only online)
        local = Path(snapshot_download(text, allow_patterns=patterns))
        if not any(local.glob("*.safetensors")):  # the first releases ship only .bin
            local = Path(snapshot_download(text, allow_patterns=patterns + ["*.bin"]))
        return local
    except Exception as e:
        raise FileNotFoundError(f"{text} is neither a local directory nor a repo id in the Hugging Face cache, and "
                                f"downloading it failed ({type(e).__name__}): check the name or your connection") from e


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}
# The memory maps of safetensors files whose tensors are alive, by start address (see release_mapped).
_MAPS: "weakref.WeakValueDictionary[int, mmap.mmap]" = weakref.WeakValueDictionary()


def _map_safetensors(file: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file as a view of a private memory map of it: nothing is read until used,
    so a loader converts one tensor at a time and gives its pages back (release_mapped) instead of holding the
    whole file beside the converted weights."""
    with open(file, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # private: writes never reach the file
    size = int.from_bytes(mapped[:8], "little")
    header = json.loads(mapped[8:8 + size])
    base = torch.frombuffer(mapped, dtype=torch.uint8, count=1).data_ptr()
    _MAPS[base] = mapped
    state = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _SAFETENSORS_DTYPES[info["dtype"]]
        start, end = info["data_offsets"]
        count = (end - start) // dtype.itemsize
        if count != math.prod(info["shape"]) or 8 + size + end > len(mapped):
            raise ValueError(f"tensor {name} does not fit the file")
        flat = torch.frombuffer(mapped, dtype=dtype, count=count, offset=8 + size + start) if count else \
            torch.empty(0, dtype=dtype)
        state[name] = flat.view(info["shape"])
    return state


def release_mapped(tensor: torch.Tensor) -> None:
    """Give back the memory of a tensor read from a mapped safetensors file, once it has been converted (a later
    read of it would read the file again). Other tensors are left alone."""
    start = tensor.data_ptr()
    for base, mapped in list(_MAPS.items()):
        if base <= start < base + len(mapped):
            first = -(-(start - base) // mmap.PAGESIZE) * mmap.PAGESIZE  # whole pages only: neighbours share edges
            last = (start - base + tensor.numel() * tensor.element_size()) // mmap.PAGESIZE * mmap.PAGESIZE
            if last > first:
                mapped.madvise(mmap.MADV_DONTNEED, first, last - first)
            return


def _read_weight_file(file: Path) -> dict[str, torch.Tensor]:
    if file.suffix == ".safetensors":
        try:
            return _map_safetensors(file)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{file} is not a readable safetensors file ({e}): the file is truncated or "
                                  "corrupt; download or convert it again") from e
    try:
        sd = torch.load(str(file), map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{file} holds Python objects other than tensors; phikit reads .bin files only with "
                              "torch.load(weights_only=True): convert it to safetensors from a trusted source") from e
    except (RuntimeError, EOFError) as e:
        raise CheckpointError(f"{file} is not a readable PyTorch weight file ({e}): re-download it") from e
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{file} does not hold a plain dict of tensors: not a phi state dict")
    return sd


def weight_files(directory: Path) -> list[Path]:
    """The weight files of a checkpoint directory: one file, or the shards its index names; safetensors preferred."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index_file = directory / index_name
        if index_file.exists():
            weight_map = _read_json(index_file).get("weight_map")
            if not weight_map or not isinstance(weight_map, dict) \
                    or not all(isinstance(v, str) for v in weight_map.values()):
                raise CheckpointError(f"{index_file} has no 'weight_map' of tensor name -> shard file: "
                                      "re-download or re-convert the checkpoint")
            shards = sorted(set(weight_map.values()))
            for shard in shards:
                if not (directory / shard).exists():
                    raise CheckpointError(f"shard {shard} listed in {index_name} is missing from {directory}")
            return [directory / shard for shard in shards]
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (directory / name).exists():
            return [directory / name]
    found = sorted(p.name for p in directory.glob("*.safetensors")) or sorted(p.name for p in directory.glob("*.bin"))
    if len(found) == 1:
        return [directory / found[0]]
    if found:  # shards whose index went missing: which file holds which tensor is unknown
        names = ", ".join(found[:3]) + (", ..." if len(found) > 3 else "")
        raise CheckpointError(f"{directory} holds {len(found)} weight files ({names}) but no "
                              "model.safetensors.index.json: copy the index that came with the shards")
    raise CheckpointError(f"no weights in {directory}: expected model.safetensors (or shards with "
                          "model.safetensors.index.json, or pytorch_model.bin)")


def read_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    """All weights of a checkpoint directory: single file or shards with an index; safetensors preferred."""
    state: dict[str, torch.Tensor] = {}
    for file in weight_files(directory):
        state.update(_read_weight_file(file))
    return state


def _read_shapes(file: Path) -> dict[str, tuple[list[int], str]]:
    """Shape and dtype name of each tensor, from the safetensors header alone (phikit info on phi-2 need not read
    5 GB); .bin files are memory-mapped, so reading them is already cheap."""
    if file.suffix != ".safetensors":
        return {k: (list(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in _read_weight_file(file).items()}
    names = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}
    try:
        with safe_open(str(file), framework="pt") as f:
            slices = {k: f.get_slice(k) for k in f.keys()}
            return {k: (s.get_shape(), names.get(s.get_dtype(), s.get_dtype().lower())) for k, s in slices.items()}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{file} is not a readable safetensors file ({e}): the file is truncated or "
                              "corrupt; download or convert it again") from e


# ---------------------------------------------------------------- layouts
def detect_layout(keys) -> str:
    keys = set(keys)
    if any(k.startswith("model.embed_tokens.") for k in keys):
        return "hf"
    if "transformer.embd.wte.weight" in keys:
        return "phi-msft"
    if "layers.0.wte.weight" in keys:
        return "mixformer-sequential"
    sample = ", ".join(sorted(keys)[:3])
    raise CheckpointError(f"unrecognized weight names ({sample}, ...): not a phi checkpoint in the HF-native, "
                          "phi-msft or mixformer-sequential layout")


def _split_qkv(prefix: str, w: torch.Tensor, b: torch.Tensor, out: dict[str, torch.Tensor]) -> None:
    # Wqkv stacks [q; k; v] along the output dim (not interleaved per head).
    for name, wi, bi in zip(("q_proj", "k_proj", "v_proj"), w.chunk(3, 0), b.chunk(3, 0)):
        out[f"{prefix}.self_attn.{name}.weight"] = wi.contiguous()
        out[f"{prefix}.self_attn.{name}.bias"] = bi.contiguous()


def to_hf_layout(state: dict[str, torch.Tensor], num_layers: int) -> tuple[dict[str, torch.Tensor], str]:
    """Rename/split a state dict of any supported layout into HF-native names."""
    state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
    layout = detect_layout(state)
    if layout == "hf":
        return state, layout
    out: dict[str, torch.Tensor] = {}
    if layout == "phi-msft":
        block = lambda i: f"transformer.h.{i}"
        embed, head = "transformer.embd.wte.weight", "lm_head"
    else:
        block = lambda i: f"layers.{i + 1}"
        embed, head = "layers.0.wte.weight", f"layers.{num_layers + 1}"
    consumed = {embed}
    out["model.embed_tokens.weight"] = state[embed]
    renames = {f"{head}.ln": "model.final_layernorm", f"{head}.linear": "lm_head"}  # module -> HF module
    for i in range(num_layers):
        src, dst = block(i), f"model.layers.{i}"
        renames |= {f"{src}.ln": f"{dst}.input_layernorm", f"{src}.mixer.out_proj": f"{dst}.self_attn.dense",
                    f"{src}.mlp.fc1": f"{dst}.mlp.fc1", f"{src}.mlp.fc2": f"{dst}.mlp.fc2"}
        wk, bk = f"{src}.mixer.Wqkv.weight", f"{src}.mixer.Wqkv.bias"
        if wk in state and bk in state:
            _split_qkv(dst, state[wk], state[bk], out)
            consumed |= {wk, bk}
    for s, d in renames.items():
        for p in ("weight", "bias"):
            if f"{s}.{p}" in state:
                out[f"{d}.{p}"] = state[f"{s}.{p}"]
                consumed.add(f"{s}.{p}")
    for key in state.keys() - consumed:  # leftovers surface as "unexpected" in validation
        out[key] = state[key]
    return out, layout


def validate_state_dict(state: dict[str, torch.Tensor], model: PhiForCausalLM) -> None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("inv_freq")}
    missing = sorted(expected.keys() - state.keys())
    extra = sorted(state.keys() - expected.keys())
    wrong = sorted(f"{k} {tuple(state[k].shape)} != {expected[k]}" for k in expected.keys() & state.keys()
                   if tuple(state[k].shape) != expected[k])
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensors ({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''})")
    if extra:
        problems.append(f"unexpected {len(extra)} tensors ({', '.join(extra[:4])}{', ...' if len(extra) > 4 else ''})")
    if wrong:
        problems.append(f"misshapen tensors ({'; '.join(wrong[:3])}{'; ...' if len(wrong) > 3 else ''})")
    if problems:
        raise CheckpointError("weights do not match config.json: " + "; ".join(problems)
                              + ": the config and weights come from different models")


def gguf_name(name: str) -> str | None:
    """llama.cpp's GGUF name for one of our tensors; None if it has none."""
    module, _, param = name.rpartition(".")
    if module in _GGUF_NAMES:
        return f"{_GGUF_NAMES[module]}.{param}"
    block = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", module)
    if block and block[2] in _GGUF_BLOCK_NAMES:
        return f"blk.{block[1]}.{_GGUF_BLOCK_NAMES[block[2]]}.{param}"
    return None


# ---------------------------------------------------------------- public API
def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if isinstance(dtype, torch.dtype) and not dtype.is_floating_point:
        raise ValueError(f"dtype {dtype} is not a floating-point type: use fp32, bf16 or fp16 (int8 is quantize=)")
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: use one of fp32, bf16, fp16")
    return DTYPES[dtype]


def _read_json(file: Path) -> dict:
    """A JSON object from a checkpoint file; anything else is a one-line CheckpointError naming the file."""
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file} is not valid JSON ({e}): fix or re-download it") from e
    if not isinstance(raw, dict):
        raise CheckpointError(f"{file} holds a JSON {type(raw).__name__}, not an object: fix or re-download it")
    return raw


def load_config(directory: Path) -> PhiConfig:
    cfg_file = directory / "config.json"
    if not cfg_file.exists():
        raise CheckpointError(f"{directory} has no config.json: not a model checkpoint directory")
    raw = _read_json(cfg_file)
    model_type = raw.get("model_type", "phi")
    if model_type not in ("phi", "phi-msft", "mixformer-sequential"):
        raise CheckpointError(f"{cfg_file} describes a {model_type!r} model: phikit loads phi models only")
    try:
        return PhiConfig.from_hf_dict(raw)
    except (ValueError, TypeError) as e:  # a missing, null or mistyped field: name the file to fix
        raise CheckpointError(f"{cfg_file}: {e}") from e


def load_tokenizer(directory: Path, config: PhiConfig | None = None) -> Tokenizer:
    if (directory / "tokenizer.json").exists():
        return Tokenizer.from_file(directory)
    if config is not None and config.vocab_size == 51200:
        # The released phi vocabulary; rebuilt offline when a checkpoint ships no tokenizer.json.
        warnings.warn(f"{directory} has no tokenizer.json: using the rebuilt phi (codegen-mono) tokenizer")
        return build_phi_tokenizer()
    raise CheckpointError(f"{directory} has no tokenizer.json: copy the tokenizer used in training next to the weights")


def _parse_device(device: str | torch.device) -> torch.device:
    try:
        device = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"unknown device {str(device)!r}: use cpu, cuda or cuda:N") from e
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"device {device} asked for, but torch sees {torch.cuda.device_count()} CUDA GPUs here: "
                         "use device cpu or an existing cuda:N")
    return device


def load(path_or_repo_id: str | os.PathLike, device: str | torch.device = "cpu",
         dtype: str | torch.dtype | None = None, quantize: str | None = None) -> tuple[PhiForCausalLM, Tokenizer]:
    """Load (model, tokenizer) from a checkpoint directory or HF repo id, in any supported layout.

    dtype None keeps fp32 on the CPU and the checkpoint's own dtype (usually fp16) on an accelerator.
    quantize="int8" (or "int8-weight-only", "int4") gives the quantized model for fast CPU/GPU decoding.
    """
    device, torch_dtype = _parse_device(device), parse_dtype(dtype)  # checked before minutes of reading weights
    if quantize:
        from .inference.quant import MODES
        if quantize not in MODES:
            raise ValueError(f"unknown quantization {quantize!r}: choose one of {', '.join(MODES)}")
    directory = resolve_checkpoint(path_or_repo_id)
    config = load_config(directory)
    state, _layout = to_hf_layout(read_state_dict(directory), config.num_hidden_layers)
    tokenizer = load_tokenizer(directory, config)
    if len(tokenizer) > config.vocab_size:
        raise CheckpointError(f"tokenizer has {len(tokenizer)} tokens but the model only {config.vocab_size} "
                              "embedding rows: tokenizer and weights do not belong together")
    config.tokenizer_vocab_size = len(tokenizer)
    with torch.device("meta"):
        model = PhiForCausalLM(config)
    validate_state_dict(state, model)
    if quantize:  # the other weights straight in the dtype the quantized model keeps them in
        from .inference.quant import activation_dtype
        torch_dtype = activation_dtype(quantize, device, torch_dtype or state["lm_head.weight"].dtype)
    elif torch_dtype is None:
        stored = state["lm_head.weight"].dtype
        torch_dtype = torch.float32 if device.type == "cpu" else stored
    # One tensor at a time, each one's file pages given back once converted: the peak is the loaded model plus
    # one tensor, not the file beside it. Quantized layers take their weights from the file as they are quantized.
    to_quantize = {f"{name}.{p}" for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)
                   for p in ("weight", "bias")} if quantize else set()
    for key in list(state):
        if key not in to_quantize:
            tensor = state[key]
            state[key] = empty_weights(tensor.shape, torch_dtype, device).copy_(tensor)
            release_mapped(tensor)
            del tensor
    model.load_state_dict(state, strict=False, assign=True)
    del state
    model.make_buffers(device)
    model.eval()
    if quantize:
        from .inference.quant import quantize_model

        def release(tensor: torch.Tensor) -> None:  # the file's pages, and the heap quantizing that layer freed
            release_mapped(tensor)
            _return_freed_memory()
        quantize_model(model, quantize, release=release)
    _return_freed_memory()
    return model, tokenizer


def _return_freed_memory() -> None:
    """Hand the heap pages freed while converting (quantizing scratch, one tensor at a time) back to the system:
    glibc keeps them in the process otherwise (int4 phi-1.5: 1.33x the weights resident instead of 1.04x; int8
    peaked at 1.6x the final size while loading until this ran after each layer)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def save(model: PhiForCausalLM, tokenizer: Tokenizer | None, directory: str | os.PathLike,
         max_shard_bytes: int = 5 * 2**30, dtype: str | torch.dtype | None = None) -> Path:
    """Write the HF-native layout whole or not at all (staged beside `directory`, then moved into place). An
    existing model directory there is replaced; any other non-empty directory is refused."""
    directory = Path(directory)
    if getattr(model, "quantized", None):
        raise ValueError("cannot save a quantized model in the HF layout: save the unquantized weights instead")
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"{directory} is a file: save into a directory (a .gguf file is `--to gguf`)")
    check_output(directory, "model")  # before the seconds of gathering the weights
    torch_dtype = parse_dtype(dtype)
    config = model.config
    state = {k: v.detach().to("cpu", torch_dtype or v.dtype).contiguous()
             for k, v in model.state_dict().items() if not k.endswith("inv_freq")}
    with staged_dir(directory, "model") as tmp:
        hf = config.to_hf_dict()
        hf["dtype"] = str(next(iter(state.values())).dtype).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
        gen = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id}
        if tokenizer is not None and tokenizer.has_chatml and tokenizer.chat_template:
            gen["eos_token_id"] = [config.eos_token_id, tokenizer.token_to_id("<|im_end|>")]
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        _write_weights(state, tmp, max_shard_bytes)
        if tokenizer is not None:
            tokenizer.save(tmp, model_max_length=config.max_position_embeddings)
    return directory


def _write_weights(state: dict[str, torch.Tensor], directory: Path, max_shard_bytes: int) -> None:
    meta = {"format": "pt"}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in state.items():
        nbytes = v.numel() * v.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(directory / "model.safetensors"), metadata=meta)
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / name), metadata=meta)
        for k, v in shard.items():
            weight_map[k] = name
            total += v.numel() * v.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def describe(path_or_repo_id: str | os.PathLike) -> dict:
    """Layout, config and parameter count of a checkpoint, without building the model."""
    directory = resolve_checkpoint(path_or_repo_id)
    config = load_config(directory)
    shapes = {}
    for file in weight_files(directory):
        shapes.update(_read_shapes(file))
    shapes = {k: v for k, v in shapes.items() if not k.endswith("inv_freq")}
    layout = detect_layout(shapes)
    # Every layout holds the same numbers (Wqkv is q, k and v stacked), so counting needs no renaming.
    return {
        "path": str(directory),
        "layout": layout,
        "dtype": ",".join(sorted({dtype for _, dtype in shapes.values()})),
        "parameters": sum(math.prod(shape) for shape, _ in shapes.values()),
        "config": {k: v for k, v in config.to_hf_dict().items() if k not in ("architectures", "rope_parameters")},
        "tokenizer": "tokenizer.json" if (directory / "tokenizer.json").exists() else "missing (phi default)",
    }
