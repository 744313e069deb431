"""The model's lifecycle: meta-device builds materialized in place, the rotary buffer, vocabulary growth, and the
decoder blocks' parameters found through wrappers."""
import pytest
import torch
import transformers
from torch import nn

from phikit import build_model, get_config
from phikit.model import decoder_block_parameters

pytestmark = pytest.mark.usefixtures("one_thread")


def test_meta_build_materializes_with_the_rotary_frequencies_of_transformers():
    config = get_config("tiny", hidden_size=160, num_attention_heads=2, partial_rotary_factor=0.4,
                        initializer_range=0.05)  # head_dim 80, rotary 32: phi-2-shaped
    model = build_model(config, meta=True)
    assert all(p.is_meta for p in model.parameters())
    model.materialize("cpu", seed=3)
    reference = transformers.models.phi.modeling_phi.PhiRotaryEmbedding(transformers.PhiConfig(**config.to_hf_dict()))
    torch.testing.assert_close(model.model.rotary_emb.inv_freq, reference.inv_freq, rtol=0, atol=0)
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            assert abs(float(module.weight.std()) - 0.05) < 0.01
            if getattr(module, "bias", None) is not None:
                assert not module.bias.any()
        elif isinstance(module, nn.LayerNorm):
            assert (module.weight == 1).all() and not module.bias.any()
    again = build_model(config, meta=True)
    again.materialize("cpu", seed=3)
    other = build_model(config, meta=True)
    other.materialize("cpu", seed=4)
    ids = torch.arange(12)[None]
    assert torch.equal(model(ids).logits, again(ids).logits)
    assert not torch.equal(model(ids).logits, other(ids).logits)


def test_a_meta_build_loaded_with_weights_equals_the_original():
    original = build_model(get_config("tiny"), seed=1).eval()
    loaded = build_model(original.config, meta=True)
    loaded.load_state_dict(original.state_dict(), assign=True)  # weights only: the rotary buffer is not saved
    loaded.make_buffers("cpu")
    ids = torch.arange(20)[None]
    assert torch.equal(original(ids).logits, loaded.eval()(ids).logits)


def test_resize_token_embeddings_keeps_the_old_rows():
    model = build_model(get_config("tiny", vocab_size=100), seed=0).eval()
    ids = torch.arange(30)[None]
    before = model(ids).logits
    model.resize_token_embeddings(128)
    assert model.config.vocab_size == 128 and model.get_input_embeddings().weight.shape[0] == 128
    after = model(ids).logits
    assert after.shape[-1] == 128
    torch.testing.assert_close(after[..., :100], before, rtol=0, atol=0)
    head = model.get_output_embeddings()
    torch.testing.assert_close(head.weight[100:], head.weight[:100].mean(0, keepdim=True).expand(28, -1))
    model.resize_token_embeddings(64)  # never shrinks
    assert model.config.vocab_size == 128


def test_decoder_block_parameters_through_a_wrapper():
    model = build_model(get_config("tiny"), seed=0)
    wrapped = nn.ModuleDict({"module": model})  # names gain a prefix, as under DDP
    by_name = [p for n, p in wrapped.named_parameters() if n.startswith("module.model.layers.")]
    assert {id(p) for p in decoder_block_parameters(wrapped)} == {id(p) for p in by_name}
    assert len(by_name) == 14 * model.config.num_hidden_layers
