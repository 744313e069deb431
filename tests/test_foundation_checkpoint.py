"""Checkpoint round trips with transformers and the two historical layouts; bad checkpoints fail clearly."""
import json

import pytest
import torch
import transformers
from safetensors.torch import save_file

import phikit
from phikit.checkpoint import CheckpointError
from phikit.inference import native
from phikit.cli import main as cli_main


def hf_reference(head_dim=64, prf=0.5, layers=2, vocab=51200):
    cfg = transformers.PhiConfig(vocab_size=vocab, hidden_size=2 * head_dim, intermediate_size=8 * head_dim,
                                 num_hidden_layers=layers, num_attention_heads=2, partial_rotary_factor=prf,
                                 max_position_embeddings=256)
    torch.manual_seed(1)
    model = transformers.PhiForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def vm_flags(address: int) -> list[str]:
    """The flags of this process's memory mapping that holds `address` (/proc/self/smaps; "hg": advised for huge
    pages)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                low, high = (int(part, 16) for part in head.split("-"))
                inside = low <= address < high
            elif inside and head == "VmFlags:":
                return line.split()[1:]
    return []


IDS = torch.tensor([[1212, 318, 257, 1332, 13, 198, 50284, 7783]])


def logits_of(model):
    with torch.no_grad():
        return model(IDS).logits


def test_transformers_save_then_phikit_load(tmp_path, phi_tokenizer):
    ref = hf_reference(head_dim=80, prf=0.4)
    ref.save_pretrained(tmp_path)
    phi_tokenizer.save(tmp_path)
    model, tok = phikit.load(tmp_path)
    assert (logits_of(ref) - logits_of(model)).abs().max() <= 1e-4
    assert len(tok) == 50295 and model.config.tokenizer_vocab_size == 50295


def test_phikit_save_then_transformers_load(tmp_path, phi_tokenizer):
    model = phikit.build_model(phikit.get_config("tiny", vocab_size=51200), seed=3)
    phikit.save(model, phi_tokenizer, tmp_path / "out")
    assert not list(tmp_path.glob(".out*")), "temporary directory left behind"
    ref = transformers.PhiForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert (logits_of(ref) - logits_of(model)).abs().max() <= 1e-4
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert hf_tok("\n    return")["input_ids"] == [198, 50284, 7783]


def test_sharded_save_round_trips(tmp_path, phi_tokenizer):
    model = phikit.build_model(phikit.get_config("tiny", vocab_size=51200), seed=4)
    phikit.save(model, phi_tokenizer, tmp_path / "sharded", max_shard_bytes=8 * 2**20)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    loaded, _ = phikit.load(tmp_path / "sharded")
    assert torch.equal(logits_of(loaded), logits_of(model))
    ref = transformers.PhiForCausalLM.from_pretrained(tmp_path / "sharded").eval()
    assert (logits_of(ref) - logits_of(model)).abs().max() <= 1e-4


def _old_layout(hf_state: dict, layers: int, layout: str) -> dict:
    """Written here independently from the library: Wqkv = [q; k; v] stacked on the output dim."""
    out = {}
    blk = (lambda i: f"transformer.h.{i}") if layout == "phi-msft" else (lambda i: f"layers.{i + 1}")
    out["transformer.embd.wte.weight" if layout == "phi-msft" else "layers.0.wte.weight"] = \
        hf_state["model.embed_tokens.weight"]
    for i in range(layers):
        s = f"model.layers.{i}"
        for p in ("weight", "bias"):
            out[f"{blk(i)}.ln.{p}"] = hf_state[f"{s}.input_layernorm.{p}"]
            out[f"{blk(i)}.mixer.Wqkv.{p}"] = torch.cat(
                [hf_state[f"{s}.self_attn.{n}.{p}"] for n in ("q_proj", "k_proj", "v_proj")], 0)
            out[f"{blk(i)}.mixer.out_proj.{p}"] = hf_state[f"{s}.self_attn.dense.{p}"]
            out[f"{blk(i)}.mlp.fc1.{p}"] = hf_state[f"{s}.mlp.fc1.{p}"]
            out[f"{blk(i)}.mlp.fc2.{p}"] = hf_state[f"{s}.mlp.fc2.{p}"]
        out[f"{blk(i)}.mixer.rotary_emb.inv_freq"] = torch.zeros(8)
    head = "lm_head" if layout == "phi-msft" else f"layers.{layers + 1}"
    for p in ("weight", "bias"):
        out[f"{head}.ln.{p}"] = hf_state[f"model.final_layernorm.{p}"]
        out[f"{head}.linear.{p}"] = hf_state[f"lm_head.{p}"]
    return {k: v.clone().contiguous() for k, v in out.items()}


@pytest.mark.parametrize("layout", ["phi-msft", "mixformer-sequential"])
@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_historical_layouts_load_with_same_logits(tmp_path, layout, fmt, phi_tokenizer):
    ref = hf_reference(head_dim=80, prf=0.4)
    state = _old_layout(ref.state_dict(), 2, layout)
    if fmt == "safetensors":
        save_file(state, str(tmp_path / "model.safetensors"))
    else:
        torch.save(state, tmp_path / "pytorch_model.bin")
    cfg = {"model_type": layout, "n_embd": 160, "n_layer": 2, "n_head": 2, "n_inner": None, "rotary_dim": 32,
           "n_positions": 256, "vocab_size": 51200, "layer_norm_epsilon": 1e-5, "activation_function": "gelu_new"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    model, _ = phikit.load(tmp_path)
    assert model.config.intermediate_size == 640 and model.config.rotary_dim == 32
    assert (logits_of(ref) - logits_of(model)).abs().max() <= 1e-4
    # phikit convert writes the HF-native layout that transformers loads
    assert cli_main(["convert", str(tmp_path), str(tmp_path / "hf")]) == 0
    back = transformers.PhiForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert (logits_of(ref) - logits_of(back)).abs().max() <= 1e-4


def test_info_prints_layout(tiny_phi_checkpoint, capsys):
    assert cli_main(["info", str(tiny_phi_checkpoint), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["layout"] == "hf" and info["parameters"] == phikit.get_config("tiny", vocab_size=51200).num_parameters()


# ---------------------------------------------------------------- bad input
def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        phikit.load(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="does not exist"):  # a relative path, not a repo id
        phikit.load("./no-such-checkpoint")
    assert cli_main(["info", str(tmp_path / "nope")]) == 2


def test_wrong_layout(tmp_path):
    save_file({"encoder.weight": torch.zeros(2, 2)}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "phi", "hidden_size": 8,
                                                      "num_attention_heads": 2, "num_hidden_layers": 1}))
    with pytest.raises(CheckpointError, match="unrecognized weight names"):
        phikit.load(tmp_path)


def test_not_a_phi_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    with pytest.raises(CheckpointError, match="phi models only"):
        phikit.load(tmp_path)


def test_truncated_safetensors(tiny_phi_checkpoint, tmp_path):
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(tiny_phi_checkpoint, bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        phikit.load(bad)


class Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_bin_pickle_holding_an_object_is_refused(tmp_path, capsys):
    torch.save({"model.embed_tokens.weight": torch.zeros(2), "x": Payload()}, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "phi", "hidden_size": 8,
                                                      "num_attention_heads": 2, "num_hidden_layers": 1}))
    with pytest.raises(CheckpointError, match="weights_only"):
        phikit.load(tmp_path)
    assert "this must never run" not in capsys.readouterr().out


def test_config_weight_mismatch_names_the_tensors(tiny_phi_checkpoint, tmp_path):
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(tiny_phi_checkpoint, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    cfg["intermediate_size"] = 256
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as err:
        phikit.load(bad)
    msg = str(err.value)
    assert "missing" in msg and "model.layers.2" in msg and "misshapen" in msg and "mlp.fc1.weight" in msg


@pytest.mark.parametrize("file,text,message", [
    ("config.json", "[1, 2]", "not an object"),
    ("model.safetensors.index.json", '{"weight_map": 5}', "weight_map"),
    ("model.safetensors.index.json", "{broken", "not valid JSON"),
    ("model.safetensors.index.json", '{"weight_map": {}}', "weight_map"),
])
def test_malformed_json_files_are_one_line_errors(tiny_phi_checkpoint, tmp_path, capsys, file, text, message):
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(tiny_phi_checkpoint, bad)
    (bad / file).write_text(text)
    with pytest.raises(CheckpointError, match=message):
        phikit.load(bad)
    assert cli_main(["info", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and file in err[0] and message in err[0]


def test_shards_without_their_index_are_named(tmp_path, phi_tokenizer):
    model = phikit.build_model(phikit.get_config("tiny", vocab_size=51200), seed=4)
    phikit.save(model, phi_tokenizer, tmp_path / "sharded", max_shard_bytes=8 * 2**20)
    (tmp_path / "sharded" / "model.safetensors.index.json").unlink()
    with pytest.raises(CheckpointError, match="model-00001-of-.*no model.safetensors.index.json"):
        phikit.load(tmp_path / "sharded")


def test_saved_checkpoint_has_the_permissions_of_any_new_file(tmp_path, phi_tokenizer):
    # The reference: what this process's umask gives a plainly created file and directory.
    (tmp_path / "plain-file").touch()
    (tmp_path / "plain-dir").mkdir()
    file_mode, dir_mode = ((tmp_path / n).stat().st_mode & 0o777 for n in ("plain-file", "plain-dir"))
    out = phikit.save(phikit.build_model(phikit.get_config("tiny", vocab_size=51200)), phi_tokenizer, tmp_path / "m")
    assert out.stat().st_mode & 0o777 == dir_mode
    assert {f.name: f.stat().st_mode & 0o777 for f in out.iterdir()} == {f.name: file_mode for f in out.iterdir()}


def test_convert_refuses_to_overwrite_and_writes_gguf_for_a_gguf_name(tiny_phi_checkpoint, tmp_path, capsys):
    gguf = pytest.importorskip("gguf")
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "notes.md").write_text("mine")
    # A directory of someone's files is never replaced, --force or not.
    for force in ([], ["--force"]):
        assert cli_main(["convert", str(tiny_phi_checkpoint), str(dst), *force]) == 2
        assert "is not a model directory" in capsys.readouterr().err and (dst / "notes.md").read_text() == "mine"
    # An earlier converted model is replaced only with --force.
    model_dir = tmp_path / "model"
    assert cli_main(["convert", str(tiny_phi_checkpoint), str(model_dir)]) == 0
    assert cli_main(["convert", str(tiny_phi_checkpoint), str(model_dir)]) == 2
    assert "--force" in capsys.readouterr().err
    assert cli_main(["convert", str(tiny_phi_checkpoint), str(model_dir), "--force"]) == 0
    assert (model_dir / "model.safetensors").exists() and not list(tmp_path.glob(".model.*"))
    # A .gguf name means GGUF: a file llama.cpp's own reader opens, not a directory called x.gguf.
    out = tmp_path / "tiny.gguf"
    assert cli_main(["convert", str(tiny_phi_checkpoint), str(out), "--dtype", "fp32"]) == 0
    assert out.is_file() and gguf.GGUFReader(out).fields["general.architecture"]
    assert cli_main(["convert", str(tiny_phi_checkpoint), str(out)]) == 2
    assert cli_main(["convert", str(tiny_phi_checkpoint), str(out), "--to", "hf", "--force"]) == 2  # a file
    assert out.is_file() and not list(tmp_path.glob(".tiny.gguf*"))


def test_convert_failing_midway_leaves_no_output(tiny_phi_checkpoint, tmp_path, monkeypatch):
    import phikit.checkpoint

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(phikit.checkpoint, "_write_weights", disk_full)
    assert cli_main(["convert", str(tiny_phi_checkpoint), str(tmp_path / "out")]) == 2  # one line, no traceback
    assert list(tmp_path.iterdir()) == []


def test_info_reads_only_the_safetensors_headers(tmp_path, monkeypatch, phi_tokenizer):
    ref = hf_reference(head_dim=80, prf=0.4)
    ref.save_pretrained(tmp_path, max_shard_size="4MB")
    import phikit.checkpoint

    def no_weights(*args, **kwargs):
        raise AssertionError("describe read the weights")

    monkeypatch.setattr(phikit.checkpoint, "_map_safetensors", no_weights)
    info = phikit.checkpoint.describe(tmp_path)
    assert info["parameters"] == ref.num_parameters() and info["dtype"] == "float32" and info["layout"] == "hf"


def test_cli_reports_os_errors_in_one_line(monkeypatch, capsys):
    """A full disk (or any refusal of the machine) mid-verb is one line and exit 2, not a traceback."""
    import errno

    import phikit.commands.info as info

    def full_disk(args):
        raise OSError(errno.ENOSPC, "No space left on device", "out/model.safetensors")
    monkeypatch.setattr(info, "run", full_disk)
    assert cli_main(["info", "somewhere"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["phikit: error: [Errno 28] No space left on device: 'out/model.safetensors'"]


@pytest.mark.parametrize("field,value,message", [
    ("num_hidden_layers", None, "lacks .*num_hidden_layers"),
    ("hidden_size", "128", "hidden_size must be a positive integer, got '128'"),
    ("num_attention_heads", 0, "num_attention_heads must be a positive integer"),
    ("max_position_embeddings", "512", "max_position_embeddings must be a positive integer"),
    ("qk_layernorm", True, "qk_layernorm"),
])
def test_malformed_config_fields_are_one_line_errors(tiny_phi_checkpoint, tmp_path, capsys, field, value, message):
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(tiny_phi_checkpoint, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg[field] = value
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=message):
        phikit.load(bad)
    for verb in ("info", "convert"):
        assert cli_main([verb, str(bad), str(tmp_path / "out")][:3 if verb == "convert" else 2]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "config.json" in err[0]


def test_unavailable_device_bad_dtype_and_quantization_fail_before_reading_weights(tiny_phi_checkpoint, monkeypatch):
    import phikit.checkpoint

    def no_weights(*args, **kwargs):
        raise AssertionError("weights were read")

    monkeypatch.setattr(phikit.checkpoint, "read_state_dict", no_weights)
    with pytest.raises(ValueError, match="cuda:99"):
        phikit.load(tiny_phi_checkpoint, device="cuda:99")
    with pytest.raises(ValueError, match="unknown device"):
        phikit.load(tiny_phi_checkpoint, device="gpu0")
    with pytest.raises(ValueError, match="not a floating-point type"):
        phikit.load(tiny_phi_checkpoint, dtype=torch.int64)
    with pytest.raises(ValueError, match="unknown quantization 'int3'"):
        phikit.load(tiny_phi_checkpoint, quantize="int3")


def test_convert_keeps_a_mixed_dtype_checkpoint_lossless(tiny_phi_checkpoint, tmp_path):
    """fp16 weights with fp32 LayerNorms (as some releases store them): converting must not round the norms."""
    import shutil
    from safetensors.torch import load_file
    src = tmp_path / "mixed"
    shutil.copytree(tiny_phi_checkpoint, src)
    state = load_file(str(src / "model.safetensors"))
    state = {k: (v + 1e-4 if "layernorm" in k else v.half()) for k, v in state.items()}
    save_file(state, str(src / "model.safetensors"))
    assert cli_main(["convert", str(src), str(tmp_path / "out")]) == 0
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert all(torch.equal(out[k].to(v.dtype), v) for k, v in state.items())


def test_phi_msft_rotary_dim_is_kept_exactly(tmp_path, phi_tokenizer):
    """rotary_dim 30 of head_dim 44: 30 / 44 * 44 is just under 30 in floating point, and must not become 29."""
    # transformers takes int(head_dim * partial_rotary_factor): 30.5 / 44 gives it rotary_dim 30 as well.
    cfg = transformers.PhiConfig(vocab_size=51200, hidden_size=88, intermediate_size=352, num_hidden_layers=2,
                                 num_attention_heads=2, partial_rotary_factor=30.5 / 44, max_position_embeddings=64)
    torch.manual_seed(2)
    ref = transformers.PhiForCausalLM(cfg).eval()
    save_file(_old_layout(ref.state_dict(), 2, "phi-msft"), str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "phi-msft", "n_embd": 88, "n_layer": 2, "n_head": 2, "n_inner": 352, "rotary_dim": 30,
        "n_positions": 64, "vocab_size": 51200}))
    phi_tokenizer.save(tmp_path)
    model, _ = phikit.load(tmp_path)
    assert model.config.rotary_dim == 30
    assert (logits_of(ref) - logits_of(model)).abs().max() <= 1e-4
    phikit.save(model, None, tmp_path / "hf")  # a config.json from which transformers also gets 30
    back = transformers.PhiForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert (logits_of(ref) - logits_of(back)).abs().max() <= 1e-4


@pytest.mark.parametrize("quantize", [None, "int8", "int4"])
def test_load_converts_tensor_by_tensor_and_keeps_no_file_mapping(tmp_path, phi_tokenizer, quantize):
    """Loading reads the memory-mapped file one tensor at a time (quantizing layer by layer), and the model it
    returns holds copies only: no mapping of the file is left once the call returns. The model equals the one
    made by loading whole and quantizing afterwards."""
    import gc

    import phikit.checkpoint as checkpoint
    from phikit.inference.quant import quantize_model
    model = phikit.build_model(phikit.get_config("tiny", vocab_size=51200), seed=0)
    phikit.save(model, phi_tokenizer, tmp_path / "m", dtype="bf16")
    released = []
    real_release = checkpoint.release_mapped
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(checkpoint, "release_mapped", lambda t: released.append(t.shape) or real_release(t))
        loaded, _ = phikit.load(tmp_path / "m", quantize=quantize)
    gc.collect()
    assert len(checkpoint._MAPS) == 0
    assert len(released) >= len(model.state_dict()) - 1  # every tensor given back after its conversion
    large = [(name, t) for name, t in [*loaded.named_parameters(), *loaded.named_buffers()]
             if t.numel() * t.element_size() >= native.HUGE_PAGE]
    assert large  # the embedding and lm_head at least: each in memory advised for 2 MB pages
    for name, t in large:
        assert "hg" in vm_flags(t.data_ptr()), name
    dtype = torch.float32 if quantize != "int4" else torch.bfloat16
    reference = model
    with torch.no_grad():
        for p in reference.parameters():  # the weights as saved (bf16), in the dtype the loaded model keeps
            p.data = p.data.bfloat16().to(dtype)
    if quantize:
        reference = quantize_model(reference, quantize)
    ids = torch.tensor([phi_tokenizer.encode("def add(a, b):")])
    with torch.inference_mode():
        torch.testing.assert_close(loaded(ids).logits, reference(ids).logits, rtol=0, atol=0)
