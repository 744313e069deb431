"""The KV cache's operations: after each one, the next decoding step's logits equal those of a fresh forward pass
of transformers' PhiForCausalLM over each row's whole sequence (no cache)."""
import pytest
import torch

from phikit.inference.kv_cache import KVCache
from test_foundation_model import SHAPES, make_pair

pytestmark = pytest.mark.usefixtures("one_thread")
VOCAB = 512


@pytest.fixture(scope="module")
def models():
    return make_pair(**SHAPES["phi-2-like"])


def fresh_last_logits(ref, rows: list[list[int]]) -> torch.Tensor:
    """Each row's last-position logits from the reference, one row at a time (no padding, no cache)."""
    with torch.no_grad():
        return torch.stack([ref(input_ids=torch.tensor([r])).logits[0, -1] for r in rows])


def prefill(ours, rows: list[list[int]]) -> tuple[KVCache, torch.Tensor]:
    """Left-padded prefill of rows of different lengths; returns the cache and its [B, length] mask."""
    width = max(map(len, rows))
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):], mask[i, width - len(r):] = torch.tensor(r), 1
    with torch.no_grad():
        cache = ours(ids, attention_mask=mask, use_cache=True).past_key_values
    return cache, mask


def step(ours, cache: KVCache, mask: torch.Tensor, tokens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    mask = torch.cat([mask, torch.ones((len(tokens), 1), dtype=mask.dtype)], 1)
    with torch.no_grad():
        logits = ours(torch.tensor(tokens)[:, None], attention_mask=mask, past_key_values=cache,
                      use_cache=True).logits[:, -1]
    return logits, mask


def rows_of(lengths: list[int]) -> list[list[int]]:
    g = torch.Generator().manual_seed(sum(lengths))
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]


def test_select_rows_with_repeats_and_dropped_padding(models):
    ref, ours = models
    rows = rows_of([4, 9, 6])
    cache, mask = prefill(ours, rows)
    index = torch.tensor([2, 0, 2])
    lead = 3  # columns every selected row has as padding (rows 2 and 0 start at 3 and 5)
    picked = cache.select_rows(index, drop_front=lead)
    assert picked.length == cache.length - lead
    logits, _ = step(ours, picked, mask[index, lead:], [7, 8, 9])
    want = fresh_last_logits(ref, [rows[2] + [7], rows[0] + [8], rows[2] + [9]])
    torch.testing.assert_close(logits, want, atol=1e-4, rtol=0)


def test_merge_right_aligns_rows_of_different_lengths(models):
    ref, ours = models
    first, second = rows_of([3, 7]), rows_of([11])
    a, mask_a = prefill(ours, first)
    b, mask_b = prefill(ours, second)
    merged = a.merge(b, headroom=5)
    assert merged.length == 11 and merged.capacity == 16
    mask = torch.zeros((3, 11), dtype=torch.long)
    mask[:2, 11 - mask_a.shape[1]:], mask[2:] = mask_a, mask_b
    logits, _ = step(ours, merged, mask, [1, 2, 3])
    want = fresh_last_logits(ref, [first[0] + [1], first[1] + [2], second[0] + [3]])
    torch.testing.assert_close(logits, want, atol=1e-4, rtol=0)


def test_compact_drops_holes(models):
    ref, ours = models
    rows = rows_of([5, 8])
    cache, mask = prefill(ours, rows)
    # Feed two columns per row; row 0 keeps its second, row 1 only its first (the second becomes a hole).
    fed = torch.tensor([[10, 11], [12, 13]])
    with torch.no_grad():
        ours(fed, attention_mask=torch.cat([mask, torch.ones_like(fed)], 1), past_key_values=cache, use_cache=True)
    mask = torch.cat([mask, torch.tensor([[1, 1], [1, 0]])], 1).bool()
    length = int(mask.sum(-1).max())
    order = torch.sort(mask.to(torch.int8), dim=1, stable=True).indices[:, -length:]
    compacted = cache.compact(order, headroom=4)
    assert compacted.length == length == 9 and compacted.capacity == 13
    logits, _ = step(ours, compacted, mask.gather(1, order).long(), [20, 21])
    want = fresh_last_logits(ref, [rows[0] + [10, 11, 20], rows[1] + [12, 21]])
    torch.testing.assert_close(logits, want, atol=1e-4, rtol=0)


def test_grow_and_crop_keep_the_columns_in_use(models):
    ref, ours = models
    rows = rows_of([6, 6])
    cache = KVCache.allocate(ours.config, 2, 8)
    with torch.no_grad():
        ours(torch.tensor(rows), past_key_values=cache, use_cache=True)
        ours(torch.tensor([[30, 31], [32, 33]]), past_key_values=cache, use_cache=True)  # fills the capacity
    cache.crop(7)  # keep the first guess only
    cache.grow(32)
    assert cache.capacity == 32 and cache.length == 7
    logits, _ = step(ours, cache, torch.ones((2, 7), dtype=torch.long), [40, 41])
    want = fresh_last_logits(ref, [rows[0] + [30, 40], rows[1] + [32, 41]])
    torch.testing.assert_close(logits, want, atol=1e-4, rtol=0)


def test_write_at_position_in_static_mode(models):
    ref, ours = models
    rows = rows_of([5])
    cache = KVCache.allocate(ours.config, 1, 16)
    with torch.no_grad():
        ours(torch.tensor(rows), past_key_values=cache, use_cache=True)
        key_mask = torch.zeros((1, 1, 16), dtype=torch.bool)
        tokens = [50, 51, 52]
        for i, token in enumerate(tokens):
            key_mask[:, 0, :6 + i] = True
            cache.write_at(5 + i)
            logits = ours.forward_static(torch.tensor([[token]]), torch.tensor([[5 + i]]), key_mask, cache)
        assert cache.length == 8
        cache.write_at(None)
        appended = ours(torch.tensor([[53]]), past_key_values=cache, use_cache=True).logits[:, -1]
    torch.testing.assert_close(logits, fresh_last_logits(ref, [rows[0] + tokens]), atol=1e-4, rtol=0)
    torch.testing.assert_close(appended, fresh_last_logits(ref, [rows[0] + tokens + [53]]), atol=1e-4, rtol=0)
    cache.reset()
    assert cache.length == 0 and cache.write_index is None
