"""The fused model's pieces: the attention rule, both backends, packing, the fast-path choice."""
from __future__ import annotations

import random
from pathlib import Path

import pytest
import sentencepiece as spm
import torch

from llamafuse.convert.sources import open_source
from llamafuse.convert.write import convert
from llamafuse.formats import RankLayout, load_manifest
from llamafuse.runtime import hellaswag
from llamafuse.runtime.evaluate import item_batch, pack
from llamafuse.runtime.load import fast_path, load_rank
from llamafuse.runtime.model import BlockAttention, FlexAttention, Model, make_batch


@pytest.fixture(scope="module")
def stories(tmp_path_factory, stories_meta: Path, data_dir: Path):
    out = tmp_path_factory.mktemp("model") / "stories"
    convert(open_source(stories_meta), out, 1, "float32", progress=False)
    m = load_manifest(out)
    sp = spm.SentencePieceProcessor(model_file=str(out / m.tokenizer))
    docs = hellaswag.load_docs(str(data_dir / "hellaswag" / "hellaswag_val.jsonl.gz"), 8)
    return m, load_rank(out, m, 0, torch.device("cpu")), hellaswag.build_items(docs, sp, True)


def test_mask_follows_the_visibility_rule():
    """Token a sees b iff same group, b not after a, and b in the prefix or in a's own branch."""
    rng = random.Random(0)
    groups = [([rng.randrange(9) for _ in range(rng.randint(1, 5))],
               [[rng.randrange(9) for _ in range(rng.randint(1, 4))] for _ in range(rng.randint(0, 4))])
              for _ in range(5)]
    b = make_batch(groups, [0])
    pad_index, unpad_index, mask = BlockAttention().prepare(b)
    S = mask.shape[-1]
    n = b.tokens.numel()
    dense = torch.zeros(n, n, dtype=torch.bool)
    for a in range(n):
        for c in range(n):
            dense[a, c] = (b.item[a] == b.item[c]) and c <= a and b.branch[c] in (0, b.branch[a])
    slot_of = {int(t): int(s) for s, t in zip(unpad_index, range(n))}
    for a in range(n):
        for c in range(n):
            sa, sc = slot_of[a], slot_of[c]
            same_row = sa // S == sc // S
            assert (same_row and bool(mask[sa // S, 0, sa % S, sc % S])) == bool(dense[a, c])
    assert torch.equal(pad_index.view(-1, S).flatten()[unpad_index], torch.arange(n))


def test_pack_places_every_item_once_within_budget(stories):
    _, _, items = stories
    batches = pack(items, 300)
    assert sorted(i for b in batches for i in b) == list(range(len(items)))
    for b in batches:
        assert len(b) == 1 or sum(items[i].n_tokens for i in b) <= 300


def test_sm80_path_pieces_equal_the_sdpa_mask_path(stories):
    """The pieces of the sm80+ path give the same log-likelihoods on the CPU as the SDPA-with-mask
    path used on the CPU and on V100s: FlexAttention over a batch padded to a fixed length, and a
    torch.compile'd block. (Inductor's CPU FlexAttention template cannot take our 3-d q/k/v views
    inside a compiled block, so the combination itself runs only on the GPU benchmark.)"""
    m, tensors, items = stories
    lay = RankLayout(m.config, 1, 0)
    batch, targets, _ = item_batch(items[:5])
    ref = Model(m.config, lay, tensors, None, BlockAttention()).target_logprobs(batch, targets)
    padded, targets_p, _ = item_batch(items[:5], pad_to=batch.tokens.numel() + m.config.max_seq_len + 5)
    flex = Model(m.config, lay, tensors, None, FlexAttention()).target_logprobs(padded, targets_p)
    assert torch.allclose(flex, ref, atol=1e-4), (flex - ref).abs().max()
    compiled = Model(m.config, lay, tensors, None, BlockAttention(), compile=True).target_logprobs(batch, targets)
    assert torch.allclose(compiled, ref, atol=1e-4), (compiled - ref).abs().max()


def test_fast_path_choice_on_cpu():
    attn, compile = fast_path(torch.device("cpu"), 128)
    assert isinstance(attn, BlockAttention) and not compile
    attn, compile = fast_path(torch.device("cpu"), 128, "flex")
    assert isinstance(attn, FlexAttention) and not compile


def test_out_of_memory_is_one_clear_error(stories):
    """A CUDA out-of-memory in the loop becomes a LlamafuseError suggesting a smaller batch."""
    from llamafuse.formats import LlamafuseError
    from llamafuse.runtime.evaluate import Settings, score_items
    from llamafuse.runtime.parallel import Context

    class Exhausted(Model):
        def target_logprobs(self, b, targets):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")
    m, tensors, items = stories
    model = Exhausted(m.config, RankLayout(m.config, 1, 0), tensors)
    ctx = Context(0, 1, 1, torch.device("cpu"), None, 0, 0, 1)
    with pytest.raises(LlamafuseError, match="--batch-tokens 4096; try --batch-tokens 2048"):
        score_items(ctx, model, items, Settings(4096, None, progress=False))
