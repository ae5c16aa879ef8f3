"""The fused model's pieces: the prefix forest and its attention rule, both backends, packing, the fast-path choice."""
from __future__ import annotations

import random
import time
from pathlib import Path

import pytest
import torch

from llamafuse.convert.sources import open_source
from llamafuse.convert.write import convert
from llamafuse.formats import ModelConfig, RankLayout, load_manifest
from llamafuse.runtime import hellaswag
from llamafuse.formats.tokenizer import read_tokenizer
from llamafuse.runtime.attention import BlockAttention, FlexAttention, choose_attention
from llamafuse.runtime.evaluate import prepare
from llamafuse.runtime.load import load_rank
from llamafuse.runtime.model import Model
from llamafuse.runtime.packing import make_batch, pack_groups, prefix_forest


@pytest.fixture(scope="module")
def stories(tmp_path_factory, stories_meta: Path, data_dir: Path):
    out = tmp_path_factory.mktemp("model") / "stories"
    convert(open_source(stories_meta), out, 1, "float32", progress=False)
    m = load_manifest(out)
    tok = read_tokenizer(out / m.tokenizer.file, m.config.vocab_size)
    docs = hellaswag.load_docs(str(data_dir / "hellaswag" / "hellaswag_val.jsonl.gz"), 8)
    return m, load_rank(out, m, 0, torch.device("cpu")), hellaswag.build_items(docs, tok, m.tokenizer.bos_id)


def sequences(item: hellaswag.Item) -> list[list[int]]:
    return [r.inputs for r in item.group().requests]


def shared_sequences(rng: random.Random, n: int = 12) -> list[list[int]]:
    """Random sequences over a tiny alphabet, many starting alike (and some duplicated)."""
    seqs = [[rng.randrange(3) for _ in range(rng.randint(1, 7))] for _ in range(n)]
    return seqs + [s[:rng.randint(1, len(s))] + [rng.randrange(3)] for s in seqs[:4]] + [seqs[0]]


@pytest.mark.parametrize("seed", range(5))
def test_forest_each_token_sees_exactly_its_own_sequence(seed):
    rng = random.Random(seed)
    seqs = shared_sequences(rng)
    f = prefix_forest(seqs)
    assert len(f) == len({tuple(s[:t + 1]) for s in seqs for t in range(len(s))})  # each prefix once
    for s, path in zip(seqs, f.index):
        for t, node in enumerate(path):
            assert f.tokens[node] == s[t] and f.positions[node] == t
            seen = {k for k in range(len(f)) if k <= node < f.end[k]}
            assert seen == set(path[:t + 1])


@pytest.mark.parametrize("block", [1, 3, 8, 128])
def test_block_attention_mask_is_the_forest_rule(block):
    """BlockAttention's per-block keys and masks, unfolded, are exactly k <= q < end[k]."""
    f = prefix_forest(shared_sequences(random.Random(block)))
    b = make_batch(f, [0], pad_to=len(f) + 5)            # filler tokens see only themselves
    end = b.end.tolist()
    n = len(end)
    keys, mask = BlockAttention(block).prepare(b)
    seen = [set() for _ in range(n)]
    for c in range(keys.shape[0]):
        for i in range(block):
            q = c * block + i
            if q < n:
                seen[q] |= {int(keys[c, j]) for j in range(keys.shape[1]) if mask[c, 0, i, j]}
    assert seen == [{k for k in range(n) if k <= q < end[k]} for q in range(n)]


@pytest.mark.parametrize("tile", [(4, 2), (8, 8), (16, 4), (128, 64)])
def test_flex_block_mask_equals_torchs_create_block_mask(tile):
    """FlexAttention.prepare builds the forest's block mask directly; torch's create_block_mask
    on the same rule gives the same tiles: skipped, masked (some pairs visible) and full (all
    pairs visible, the mask function skipped), also where the length is not a tile multiple."""
    from torch.nn.attention.flex_attention import create_block_mask
    rng = random.Random(tile[0] * 31 + tile[1])
    seqs = [[rng.randrange(3) for _ in range(rng.randint(1, 20))] for _ in range(30)]
    seqs.append([rng.randrange(3) for _ in range(260)])   # long: its later tiles see whole key tiles
    f = prefix_forest(seqs + [s[:rng.randint(1, len(s))] + [7] for s in seqs[-10:]])
    for extra in (0, 5, 3 * tile[1] + 1):
        b = make_batch(f, [0], pad_to=len(f) + extra)
        end = b.end
        ours = FlexAttention(tile).prepare(b)
        n = end.numel()
        torchs = create_block_mask(lambda _b, _h, q, k: (k <= q) & (q < end[k]), None, None, n, n,
                                   device="cpu", BLOCK_SIZE=tile)
        assert (ours.BLOCK_SIZE, ours.seq_lengths) == (torchs.BLOCK_SIZE, torchs.seq_lengths)
        for counts, indices in (("kv_num_blocks", "kv_indices"), ("full_kv_num_blocks", "full_kv_indices"),
                                ("q_num_blocks", "q_indices"), ("full_q_num_blocks", "full_q_indices")):
            a, b_ = getattr(ours, counts)[0, 0], getattr(torchs, counts)[0, 0]
            assert torch.equal(a, b_), (counts, extra)
            for i, c in enumerate(a.tolist()):
                assert torch.equal(getattr(ours, indices)[0, 0, i, :c].sort().values,
                                   getattr(torchs, indices)[0, 0, i, :c].sort().values), (indices, i)
        assert ours.full_kv_num_blocks.sum() > 0 and ours.kv_num_blocks.sum() > 0   # both kinds occur


@pytest.mark.parametrize("budget", [1, 8, 20, 64])
def test_pack_groups_fits_the_budget_and_keeps_groups_whole(budget):
    """Random groups with shared and interleaving starts: each group lands in one batch once,
    and a batch's real forest never exceeds the budget unless it holds a single group."""
    rng = random.Random(budget)
    groups = [shared_sequences(rng, rng.randint(1, 4))[:rng.randint(1, 4)] for _ in range(40)]
    batches = pack_groups(groups, budget)
    assert sorted(g for b in batches for g in b) == list(range(len(groups)))
    for b in batches:
        size = len(prefix_forest([s for g in b for s in groups[g]]))
        assert size <= budget or len(b) == 1
    if budget == 64:
        assert len(batches) < len(groups)


def test_pack_places_every_item_once_within_budget_sharing_prefixes(stories):
    _, _, items = stories
    batches = pack_groups([sequences(it) for it in items], 300)
    assert sorted(i for b in batches for i in b) == list(range(len(items)))
    sizes = [len(prefix_forest([s for i in b for s in sequences(items[i])])) for b in batches]
    assert all(n <= 300 or len(b) == 1 for n, b in zip(sizes, batches))
    alone = sum(len(prefix_forest(sequences(it))) for it in items)
    assert sum(sizes) < alone < sum(it.n_tokens for it in items)  # shared across and within items


@pytest.mark.slow
def test_sm80_path_pieces_equal_the_sdpa_mask_path(stories):
    """The pieces of the GPU paths give the same log-likelihoods on the CPU as the eager SDPA-with-mask
    path: FlexAttention over a batch padded to a fixed length, a torch.compile'd block, and the
    work around an eager attention call compiled (the V100 path's option). (Inductor's CPU FlexAttention template cannot take our 3-d q/k/v views
    inside a compiled block, so the combination itself runs only on the GPU benchmark.)"""
    from torch._dynamo.utils import counters
    m, tensors, items = stories
    lay = RankLayout(m.config, 1, 0)
    groups = [it.group() for it in items[:5]]
    ib = prepare(groups)
    ref, ref_greedy = Model(m.config, lay, tensors, None, BlockAttention()).target_logprobs(*ib[:3])
    padded = prepare(groups, pad_to=ib.tokens + m.config.max_seq_len + 5)
    flex_model = Model(m.config, lay, tensors, None, FlexAttention())
    flex_model.warm_up(len(padded.batch.tokens), tensors)
    graphs = counters["stats"]["unique_graphs"]
    flex, greedy = flex_model.target_logprobs(*padded[:3])
    assert torch.allclose(flex, ref, atol=1e-4), (flex - ref).abs().max()
    assert torch.equal(greedy, ref_greedy)
    other = prepare([it.group() for it in items[5:8]], pad_to=len(padded.batch.tokens))
    flex_model.target_logprobs(*other[:3])
    assert counters["stats"]["unique_graphs"] == graphs   # another forest's mask: same kernels, no recompile
    for mode in ("block", "around-attention"):   # the sm80+ block, and the one around the V100 path's attention
        compiled, greedy = Model(m.config, lay, tensors, None, BlockAttention(), compile=mode).target_logprobs(*ib[:3])
        assert torch.allclose(compiled, ref, atol=1e-4), (mode, (compiled - ref).abs().max())
        assert torch.equal(greedy, ref_greedy)


def test_mask_tile_fits_the_kernel():
    """128x64 only where it was measured to fit FlexAttention's kernel (float16, head_dim 128);
    elsewhere 128x128, a multiple of any kernel tile."""
    from llamafuse.runtime.attention import mask_tile
    assert mask_tile(128, torch.float16) == (128, 64)
    assert mask_tile(64, torch.float16) == mask_tile(128, torch.bfloat16) == mask_tile(64, torch.float32) == (128, 128)
    attn, _ = choose_attention(torch.device("cpu"), 64, "flex", torch.float16)
    assert attn.block == (128, 128)


def test_attention_choice_on_cpu():
    attn, compile = choose_attention(torch.device("cpu"), 128)
    assert isinstance(attn, BlockAttention) and not attn.fixed_shape and compile is None
    attn, compile = choose_attention(torch.device("cpu"), 128, "flex")
    assert isinstance(attn, FlexAttention) and attn.fixed_shape and compile is None


def test_out_of_memory_is_one_clear_error(stories):
    """A CUDA out-of-memory in the loop becomes a LlamafuseError suggesting a smaller batch."""
    from llamafuse.formats import LlamafuseError
    from llamafuse.runtime.evaluate import Settings, score_groups
    from llamafuse.runtime.parallel import Context

    class Exhausted(Model):
        def target_logprobs(self, b, rows, targets):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")
    m, tensors, items = stories
    model = Exhausted(m.config, RankLayout(m.config, 1, 0), tensors)
    ctx = Context(0, 1, 1, torch.device("cpu"), None, 0, 0, 1, time.time())
    with pytest.raises(LlamafuseError, match="--batch-tokens 4096; try --batch-tokens 2048"):
        score_groups(ctx, model, [it.group() for it in items], Settings(4096, progress=False))


def test_warm_up_runs_a_filler_batch_on_placeholders(stories):
    """warm_up (what the compile phase runs while the weights load) takes a batch of filler tokens
    of the requested length through one block on placeholder weights, eager and with the work around
    attention compiled (inductor's CPU backend; FlexAttention's compiled kernel: the slow test
    above), and the model then scores with its real weights set afterwards, without compiling again."""
    from llamafuse.runtime.load import placeholder_layer
    m, tensors, items = stories
    placeholders = placeholder_layer(m, torch.device("cpu"))
    assert set(placeholders) == {k for k in tensors if k.startswith("layers.0.")}
    assert all(placeholders[k].shape == tensors[k].shape and placeholders[k].dtype == tensors[k].dtype
               for k in placeholders)
    ib = prepare([it.group() for it in items[:3]])
    lay = RankLayout(m.config, 1, 0)
    ref = Model(m.config, lay, tensors, None, BlockAttention()).target_logprobs(*ib[:3])[0]
    from torch._dynamo.utils import counters
    for mode in (None, "around-attention"):
        model = Model(m.config, lay, {}, None, BlockAttention(), compile=mode)
        model.warm_up(96, placeholders)
        graphs = counters["stats"]["unique_graphs"]
        model.w = tensors
        assert torch.allclose(model.target_logprobs(*ib[:3])[0], ref, atol=1e-4), mode
        assert counters["stats"]["unique_graphs"] == graphs, f"{mode}: compiled again for the real weights"


def test_attention_choice_on_gpus(monkeypatch):
    """sm80+: FlexAttention, one compiled graph per block; sm70 (V100): SDPA with masks, the work
    around the attention call compiled."""
    for cap, backend, mode in (((9, 0), FlexAttention, "block"), ((7, 0), BlockAttention, "around-attention")):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None, cap=cap: cap)
        attn, compile = choose_attention(torch.device("cuda", 0), 128)
        assert isinstance(attn, backend) and compile == mode


def test_a_compiling_model_compiles_in_this_process(monkeypatch):
    """A model that compiles sets inductor to compile its kernels in this process (no pool of
    worker processes to start), unless TORCHINDUCTOR_COMPILE_THREADS names a number; an eager
    model leaves the setting alone."""
    import torch._inductor.config as inductor
    c = ModelConfig(dim=64, n_layers=1, n_heads=4, n_kv_heads=4, head_dim=16, ffn_dim=128, vocab_size=32,
                    norm_eps=1e-5, rope_theta=10000.0, max_seq_len=64)
    lay = RankLayout(c, 1, 0)
    monkeypatch.setattr(inductor, "compile_threads", 8)
    Model(c, lay, {}, None, BlockAttention())
    assert inductor.compile_threads == 8
    Model(c, lay, {}, None, BlockAttention(), compile="around-attention")
    assert inductor.compile_threads == 1
    monkeypatch.setattr(inductor, "compile_threads", 8)
    monkeypatch.setenv("TORCHINDUCTOR_COMPILE_THREADS", "8")
    Model(c, lay, {}, None, BlockAttention(), compile="block")
    assert inductor.compile_threads == 8


def test_a_paced_model_keeps_few_layers_queued(stories, monkeypatch):
    """`Model(pace=n)` records an event after each layer and, once more than n are pending, waits
    for the oldest (CUDA's events stood in for on the CPU): at most n layers are queued ahead of
    the thread, which sleeps rather than block in a full launch queue holding the GIL. An unpaced
    model records none, and pacing leaves the scores as they are."""
    log: list[tuple[str, int]] = []

    class Event:
        made = 0

        def __init__(self, blocking: bool = False) -> None:
            assert blocking, "a paced wait must sleep, not spin"
            self.n, Event.made = Event.made, Event.made + 1

        def record(self, stream=None) -> None:
            log.append(("record", self.n))

        def synchronize(self) -> None:
            log.append(("wait", self.n))
    monkeypatch.setattr(torch.cuda, "Event", Event)
    m, tensors, items = stories
    ib = prepare([it.group() for it in items[:2]])
    lay = RankLayout(m.config, 1, 0)
    ref = Model(m.config, lay, tensors, None, BlockAttention()).target_logprobs(*ib[:3])[0]
    assert log == []
    n_layers, pace = m.config.n_layers, 2
    got = Model(m.config, lay, tensors, None, BlockAttention(), pace=pace).target_logprobs(*ib[:3])[0]
    assert torch.equal(got, ref)
    expected = []
    for i in range(n_layers):
        expected.append(("record", i))
        if i >= pace:
            expected.append(("wait", i - pace))
    assert log == expected and n_layers > pace
