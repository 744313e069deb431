"""Logit, hidden-state and attention parity with transformers' PhiForCausalLM (the reference implementation)."""
import pytest
import torch
import transformers

from phikit.config import PhiConfig, get_config
from phikit.model import KVCache, PhiForCausalLM

SHAPES = {
    "phi-1_5-like": dict(head_dim=64, partial_rotary_factor=0.5),  # rotary 32 of 64
    "phi-2-like": dict(head_dim=80, partial_rotary_factor=0.4),  # rotary 32 of 80
}


def make_pair(head_dim: int, partial_rotary_factor: float, layers: int = 2, heads: int = 2, vocab: int = 512):
    hf_cfg = transformers.PhiConfig(
        vocab_size=vocab, hidden_size=head_dim * heads, intermediate_size=4 * head_dim * heads,
        num_hidden_layers=layers, num_attention_heads=heads, partial_rotary_factor=partial_rotary_factor,
        max_position_embeddings=128, attn_implementation="eager")
    torch.manual_seed(0)
    ref = transformers.PhiForCausalLM(hf_cfg).eval()
    with torch.no_grad():  # non-trivial biases and LayerNorms, so a dropped bias cannot hide
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    ours = PhiForCausalLM(PhiConfig.from_hf_dict(hf_cfg.to_dict())).eval()
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def left_padded_batch(vocab: int):
    ids = torch.randint(0, vocab, (3, 16))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    mask[2, :11] = 0
    return ids, mask


@pytest.mark.parametrize("shape", SHAPES)
def test_logits_hidden_states_attentions_match_transformers(shape):
    ref, ours = make_pair(**SHAPES[shape])
    assert ours.config.rotary_dim == 32
    ids, mask = left_padded_batch(512)
    with torch.no_grad():
        a = ref(input_ids=ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)
        b = ours(ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)
        fast = ours(ids, attention_mask=mask)  # SDPA path
    real = mask.bool()
    assert (a.logits - b.logits)[real].abs().max() <= 1e-4
    assert (a.logits - fast.logits)[real].abs().max() <= 1e-4
    assert len(a.hidden_states) == len(b.hidden_states)
    for x, y in zip(a.hidden_states, b.hidden_states):
        assert (x - y)[real].abs().max() <= 1e-4
    assert len(a.attentions) == len(b.attentions)
    for x, y in zip(a.attentions, b.attentions):  # [B, H, Tq, Tk]; compare rows of real query tokens
        assert (x - y).transpose(1, 2)[real].abs().max() <= 1e-5


def test_unpadded_forward_and_inputs_embeds_match():
    ref, ours = make_pair(**SHAPES["phi-2-like"])
    ids = torch.randint(0, 512, (2, 20))
    with torch.no_grad():
        a = ref(input_ids=ids).logits
        b = ours(ids).logits
        embeds = ours.get_input_embeddings()(ids) * 1.5  # custom embeddings, not the lookup
        c = ref(inputs_embeds=embeds).logits
        d = ours(inputs_embeds=embeds).logits
    assert (a - b).abs().max() <= 1e-4
    assert (c - d).abs().max() <= 1e-4


@pytest.mark.parametrize("shape", SHAPES)
def test_kv_cache_incremental_equals_full_forward(shape):
    _, ours = make_pair(**SHAPES[shape])
    ids, mask = left_padded_batch(512)
    with torch.no_grad():
        full = ours(ids, attention_mask=mask).logits
        for cache in (KVCache(ours.config.num_hidden_layers),
                      KVCache.allocate(ours.config, 3, 32)):
            steps = [ours(ids[:, :12], attention_mask=mask[:, :12], past_key_values=cache, use_cache=True).logits]
            for i in range(12, 16):
                out = ours(ids[:, i:i + 1], attention_mask=mask[:, :i + 1], past_key_values=cache, use_cache=True)
                steps.append(out.logits)
            assert cache.length == 16
            inc = torch.cat(steps, 1)
            assert (inc - full)[mask.bool()].abs().max() <= 1e-4


def test_unmasked_cache_decoding_matches():
    _, ours = make_pair(**SHAPES["phi-1_5-like"])
    ids = torch.randint(0, 512, (1, 10))
    with torch.no_grad():
        full = ours(ids).logits
        out = ours(ids[:, :6], use_cache=True)
        steps = [out.logits]
        for i in range(6, 10):
            out = ours(ids[:, i:i + 1], past_key_values=out.past_key_values, use_cache=True)
            steps.append(out.logits)
    assert (torch.cat(steps, 1) - full).abs().max() <= 1e-4


def test_single_query_attention_equals_fused_attention():
    """CPU decoding steps (one query) take their own attention, faster there than torch's fused kernel."""
    import torch.nn.functional as F
    from phikit.model import single_query_attention
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, n, 64, generator=g) for n in (1, 20, 20))
    mask = torch.rand(2, 1, 1, 20, generator=g) < 0.6
    mask[..., -1] = True  # the new token sees itself
    for m in (mask, None):
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=0.125)
        assert (single_query_attention(q, k, v, m, 0.125) - ref).abs().max() <= 1e-6
        halves = [t.bfloat16() for t in (q, k, v)]  # bf16 in, bf16 out, fp32 inside
        ref = F.scaled_dot_product_attention(*(t.float() for t in halves), attn_mask=m, scale=0.125)
        out = single_query_attention(*halves, m, 0.125)
        assert out.dtype == torch.bfloat16 and (out.float() - ref).abs().max() <= 1e-2


def test_single_query_attention_reuses_its_upcast_buffers_safely():
    """bf16 caches are upcast into buffers kept between calls: a longer cache grows them, an earlier result is not
    overwritten by a later call, and a buffer made under inference_mode still takes a plain no_grad call."""
    import torch.nn.functional as F
    from phikit.model import single_query_attention
    g = torch.Generator().manual_seed(1)

    def case(length):
        q, k, v = (torch.randn(2, 4, n, 64, generator=g).bfloat16() for n in (1, length, length))
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), scale=0.125)
        return (q, k, v), ref

    (short, ref_short), (long, ref_long), (longer, ref_longer) = case(9), case(33), case(65)
    with torch.inference_mode():
        first = single_query_attention(*long, None, 0.125)
    with torch.no_grad():
        second = single_query_attention(*short, None, 0.125)  # writes into the buffer the first call made
    third = single_query_attention(*longer, None, 0.125)  # grows it
    assert (first.float() - ref_long).abs().max() <= 1e-2
    assert (second.float() - ref_short).abs().max() <= 1e-2
    assert (third.float() - ref_longer).abs().max() <= 1e-2
    assert torch.equal(first, single_query_attention(*long, None, 0.125))


def test_segment_ids_isolate_packed_documents():
    _, ours = make_pair(**SHAPES["phi-1_5-like"])
    a, b = torch.randint(0, 512, (1, 7)), torch.randint(0, 512, (1, 5))
    packed = torch.cat([a, b], 1)
    seg = torch.tensor([[0] * 7 + [1] * 5])
    pos = torch.tensor([list(range(7)) + list(range(5))])
    with torch.no_grad():
        out = ours(packed, segment_ids=seg, position_ids=pos).logits
        sep_a, sep_b = ours(a).logits, ours(b).logits
    assert (out[:, :7] - sep_a).abs().max() <= 1e-4
    assert (out[:, 7:] - sep_b).abs().max() <= 1e-4


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_fp16_attention_scores_do_not_overflow(device):
    # Large activations make q.k^T exceed the fp16 range (phi-2's failure in fp16); scores are computed in fp32
    # (the CPU paths upcast, CUDA's fused kernels accumulate in fp32), so logits stay finite: for a prompt, with
    # attentions returned, and for decoding steps on the KV cache.
    _, ours = make_pair(**SHAPES["phi-2-like"])
    with torch.no_grad():
        for layer in ours.model.layers:
            layer.self_attn.q_proj.weight.mul_(300.0)
            layer.self_attn.k_proj.weight.mul_(300.0)
    ours = ours.half().to(device)
    ids = torch.randint(0, 512, (1, 12), device=device)
    with torch.no_grad():
        q = ours.model.layers[0].self_attn.q_proj(ours.model.layers[0].input_layernorm(ours.model.embed_tokens(ids)))
        head = q[..., :80]  # one head's queries (keys are scaled alike): their fp16 products overflow
        assert not torch.isfinite(head @ head.transpose(-1, -2)).all()
        out = ours(ids, output_attentions=True)
        fast = ours(ids, use_cache=True)
        step = ours(ids[:, :1], past_key_values=fast.past_key_values, use_cache=True)
    assert torch.isfinite(out.logits).all() and torch.isfinite(fast.logits).all()
    assert torch.isfinite(step.logits).all()


def test_presets_have_the_released_sizes():
    assert get_config("phi-1_5").num_parameters() == 1_418_270_720
    assert get_config("phi-1").num_parameters() == 1_418_270_720
    assert get_config("phi-2").num_parameters() == 2_779_683_840
    assert get_config("phi-2").head_dim == 80 and get_config("phi-2").rotary_dim == 32
    cfg = get_config("tiny")
    model = PhiForCausalLM(cfg)
    assert model.num_parameters() == cfg.num_parameters()
    assert cfg.flops_per_token(256) > 6 * (cfg.num_parameters() - cfg.vocab_size * cfg.hidden_size)


def test_bad_configs_and_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="divisible"):
        PhiConfig(hidden_size=100, num_attention_heads=3)
    with pytest.raises(ValueError, match="unknown preset"):
        get_config("phi-9")
    model = PhiForCausalLM(get_config("tiny", max_position_embeddings=16)).eval()
    with pytest.raises(ValueError, match="exceeds the context"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="outside the embedding"):
        model(torch.tensor([[5000]]))


def test_loss_matches_transformers_with_ignored_labels_and_unbatched_input():
    ref, ours = make_pair(**SHAPES["phi-2-like"])
    ids = torch.randint(0, 512, (2, 12))
    labels = ids.clone()
    labels[0, :4] = -100
    labels[1, 7:] = -100
    with torch.no_grad():
        a = ref(input_ids=ids, labels=labels).loss
        b = ours(ids, labels=labels).loss
        # One unbatched sequence: its labels and mask are unbatched too.
        c = ref(input_ids=ids[:1], labels=labels[:1]).loss
        d = ours(ids[0], labels=labels[0], attention_mask=torch.ones(12, dtype=torch.long)).loss
        kept = torch.tensor([0, 5, 11])  # logits_to_keep as positions, as transformers takes it
        e = ref(input_ids=ids, logits_to_keep=kept).logits
        f = ours(ids, logits_to_keep=kept).logits
    assert abs(a.item() - b.item()) <= 1e-5 and abs(c.item() - d.item()) <= 1e-5
    assert e.shape == f.shape == (2, 3, 512) and (e - f).abs().max() <= 1e-4


@pytest.mark.parametrize("case,message", [
    ("empty", "empty input"),
    ("negative id", "token id -1 is outside"),
    ("float ids", "input_ids must be int64"),
    ("3-d ids", "input_ids must be int64"),
    ("2-d embeds", r"inputs_embeds has shape \(6, 160\)"),
    ("narrow embeds", r"expected \[batch, seq, 160\]"),
    ("fp64 embeds", "inputs_embeds.to"),
    ("short positions", "position_ids has shape"),
    ("1-d mask for a batch", "attention_mask has shape"),
    ("short labels", "labels have shape"),
    ("labels with logits_to_keep", "drop logits_to_keep"),
    ("negative logits_to_keep", "logits_to_keep is -2"),
    ("transformers cache", "past_key_values is a DynamicCache"),
])
def test_malformed_inputs_are_one_line_errors(case, message):
    ref, ours = make_pair(**SHAPES["phi-2-like"], layers=1)
    ids = torch.randint(0, 512, (2, 6))
    embeds = ours.get_input_embeddings()(ids).detach()
    kwargs = {
        "empty": dict(input_ids=ids[:, :0]),
        "negative id": dict(input_ids=ids.clone().index_fill_(1, torch.tensor([3]), -1)),
        "float ids": dict(input_ids=ids.float()),
        "3-d ids": dict(input_ids=ids[None]),
        "2-d embeds": dict(inputs_embeds=embeds[0]),
        "narrow embeds": dict(inputs_embeds=embeds[..., :100]),
        "fp64 embeds": dict(inputs_embeds=embeds.double()),
        "short positions": dict(input_ids=ids, position_ids=torch.arange(4)),
        "1-d mask for a batch": dict(input_ids=ids, attention_mask=torch.ones(6, dtype=torch.long)),
        "short labels": dict(input_ids=ids, labels=ids[:, :4]),
        "labels with logits_to_keep": dict(input_ids=ids, labels=ids, logits_to_keep=1),
        "negative logits_to_keep": dict(input_ids=ids, logits_to_keep=-2),
        "transformers cache": dict(input_ids=ids, past_key_values=ref(input_ids=ids, use_cache=True).past_key_values),
    }[case]
    with pytest.raises(ValueError, match=message) as err, torch.no_grad():
        ours(**kwargs)
    assert "\n" not in str(err.value)
