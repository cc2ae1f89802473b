"""routing_stats: equal to counting one-text traces by hand; resumable; mergeable; memory flat in corpus size."""
import collections
import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import workbench as wb
from workbench.analysis.routing_stats import (
    RoutingStats,
    RoutingStatsError,
    RoutingStatsMismatchError,
    merge_routing_stats,
    routing_stats,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = "the cat sat on a mat while seven tired dogs barked at noon under grey skies".split()


def corpus(n: int, seed: int = 0) -> list[str]:
    """Texts of varied length (1..60 words, some past max_tokens), one empty."""
    g = torch.Generator().manual_seed(seed)
    texts = []
    for i in range(n):
        length = int(torch.randint(1, 60, (1,), generator=g))
        texts.append(" ".join(WORDS[int(j)] for j in torch.randint(0, len(WORDS), (length,), generator=g)))
    texts[3] = ""
    return texts


@pytest.fixture(scope="module")
def session(tiny_checkpoint):
    return wb.load(str(tiny_checkpoint("gpt_oss")), preset="cpu")


def naive(s, texts, max_tokens, bins=20):
    """Trace each text alone (batch of one) and count everything with plain Python."""
    E = 8
    load, top1, coact = collections.Counter(), collections.Counter(), collections.Counter()
    weight, table = collections.defaultdict(float), collections.Counter()
    ent_sum, hist, tokens, layers = collections.defaultdict(float), collections.Counter(), 0, None
    for text in texts:
        ids = s.tokenizer(text)["input_ids"][:max_tokens]
        if not ids:
            continue
        t = s.trace(ids, what=["routing"])
        layers = t.routing.layers
        tokens += len(ids)
        for row, layer in enumerate(layers):
            for pos, tid in enumerate(ids):
                chosen = t.routing.indices[row, pos].tolist()
                top1[layer, chosen[0]] += 1
                for j, e in enumerate(chosen):
                    load[layer, e] += 1
                    weight[layer, e] += float(t.routing.weights[row, pos, j])
                    table[tid, layer, e] += 1
                    for f in chosen:
                        coact[layer, e, f] += 1
                logp = torch.log_softmax(t.routing.logits[row, pos].double(), -1)
                h = float(-(logp.exp() * logp).sum()) / math.log(2)
                ent_sum[layer] += h
                hist[layer, min(max(int(h / math.log2(E) * bins), 0), bins - 1)] += 1
    return dict(load=load, top1=top1, coact=coact, weight=weight, table=table, ent_sum=ent_sum, hist=hist,
                tokens=tokens, layers=layers)


def as_counter(st: RoutingStats) -> collections.Counter:
    """The token table as {(token id, layer, expert): count}, whatever its row order."""
    out = collections.Counter()
    for (r, l, e) in st.token_experts.nonzero().tolist():
        out[int(st.token_ids[r]), st.layers[l], e] = int(st.token_experts[r, l, e])
    return out


def assert_same(a: RoutingStats, b: RoutingStats, exact_floats: bool = True):
    assert (a.texts, a.tokens, a.layers) == (b.texts, b.tokens, b.layers)
    for name in ("expert_load", "top1", "coactivation", "entropy_hist"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    for name in ("expert_load_weight", "entropy_sum"):
        if exact_floats:
            assert torch.equal(getattr(a, name), getattr(b, name)), name
        else:
            torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=1e-12, atol=1e-9)
    assert as_counter(a) == as_counter(b)


@pytest.mark.parametrize("preset,n", [("cpu", 30), ("bf16", 10)])
def test_equals_naive_per_text_counts(tiny_checkpoint, session, preset, n):
    s = session if preset == "cpu" else wb.load(str(tiny_checkpoint("gpt_oss")), preset=preset)
    texts = corpus(n)
    items = ({"text": t} for t in texts)  # a lazy, datasets-like iterable of dicts
    st = routing_stats(s, items, batch_size=4, max_tokens=48, progress=False)
    ref = naive(s, texts, 48)
    L, E = len(st.layers), st.num_experts
    assert st.layers == ref["layers"] and st.texts == n and st.tokens == ref["tokens"]
    assert st.tokens < sum(len(s.tokenizer(t)["input_ids"]) for t in texts)  # truncation happened
    for li, layer in enumerate(st.layers):
        for e in range(E):
            assert st.expert_load[li, e] == ref["load"][layer, e]
            assert st.top1[li, e] == ref["top1"][layer, e]
            assert math.isclose(st.expert_load_weight[li, e], ref["weight"][layer, e], rel_tol=1e-6, abs_tol=1e-6)
            for f in range(E):
                assert st.coactivation[li, e, f] == ref["coact"][layer, e, f]
        assert math.isclose(st.entropy_sum[li], ref["ent_sum"][layer], rel_tol=1e-6)
        assert st.entropy_hist[li].tolist() == [ref["hist"][layer, b] for b in range(st.meta["bins"])]
    assert as_counter(st) == ref["table"]
    assert torch.equal(st.coactivation.diagonal(dim1=1, dim2=2), st.expert_load)
    assert torch.equal(st.expert_load.sum(1), torch.full((L,), st.tokens * st.top_k))
    # each token's k weights sum to 1, up to the rounding of the dtype the model applied them in
    torch.testing.assert_close(st.expert_load_weight.sum(1), torch.full((L,), float(st.tokens), dtype=torch.float64),
                               rtol=1e-6 if preset == "cpu" else 1e-3, atol=0)


def test_helpers_and_interventions(session):
    texts = corpus(12)
    st = routing_stats(session, texts, batch_size=5, max_tokens=32, progress=False)
    top = st.top_tokens(st.layers[1], 2, k=3, tokenizer=session.tokenizer)
    counts = st.token_experts[:, 1, 2]
    assert [c for _, _, c, _ in top] == sorted(counts.tolist(), reverse=True)[:3]
    assert all(isinstance(text, str) and 0 < share <= 1 for _, text, _, share in top)
    bal = st.load_balance()
    assert set(bal) == {"cv", "max_over_mean", "min_over_mean", "normalized_entropy"}
    assert bool((bal["normalized_entropy"] <= 1 + 1e-9).all()) and bool((bal["max_over_mean"] >= 1).all())
    assert "12 texts" in repr(st)
    with pytest.raises(RoutingStatsError):
        st.row(99)
    with session.ablate_experts({1: [0, 5]}):  # stats inside an intervention see the model's real routing
        ablated = routing_stats(session, texts, batch_size=5, max_tokens=32, progress=False)
    assert ablated.expert_load[st.row(1), [0, 5]].tolist() == [0, 0] and st.expert_load[st.row(1), [0, 5]].sum() > 0
    assert torch.equal(ablated.expert_load[st.row(0)], st.expert_load[st.row(0)])  # layers before it unchanged


def test_dense_model_refused():
    s = wb.Session(model=None, tokenizer=None, adapter=wb.adapter_for(type("C", (), {"model_type": "llama"}))[0],
                   report=None)
    with pytest.raises(RoutingStatsError, match="dense"):
        routing_stats(s, ["x"])


def test_resume_after_interruption_equals_one_run(session, tmp_path):
    texts = corpus(30, seed=1)
    full = routing_stats(session, texts, batch_size=4, max_tokens=40, progress=False)
    path = tmp_path / "stats.safetensors"

    def interrupted():
        for i, t in enumerate(texts):
            if i == 8:  # checkpoint_every=1: two batches were saved before the third starts
                assert RoutingStats.load(path).texts == 8
            if i == 13:
                raise KeyboardInterrupt("stopped by the user")
            yield t

    with pytest.raises(KeyboardInterrupt):
        routing_stats(session, interrupted(), batch_size=4, max_tokens=40, progress=False, checkpoint=path,
                      checkpoint_every=1)
    partial = RoutingStats.load(path)  # the name notebook 06 uses
    assert partial.texts == 12  # the half-read fourth batch was not counted
    meta = json.loads(__import__("safetensors").safe_open(str(path), "pt").metadata()["workbench"])
    assert meta["format"] == "workbench-routing-stats" and meta["texts"] == 12
    assert not [p for p in os.listdir(tmp_path) if p != "stats.safetensors"]  # no temp file left behind
    resumed = routing_stats(session, iter(texts), batch_size=4, max_tokens=40, progress=False, checkpoint=path)
    assert_same(resumed, full)
    again = routing_stats(session, texts, batch_size=4, max_tokens=40, progress=False, checkpoint=path)
    assert_same(again, full)  # everything already counted: nothing more is added


def test_checkpoint_from_another_model_or_setting_raises(session, tiny_checkpoint, tmp_path):
    path = tmp_path / "stats.safetensors"
    routing_stats(session, corpus(4), batch_size=2, max_tokens=16, progress=False, checkpoint=path)
    with pytest.raises(RoutingStatsMismatchError, match="max_tokens"):
        routing_stats(session, corpus(4), max_tokens=32, progress=False, checkpoint=path)
    other = wb.load(str(tiny_checkpoint("mixtral")), preset="cpu")
    with pytest.raises(RoutingStatsMismatchError, match="config"):
        routing_stats(other, corpus(4), max_tokens=16, progress=False, checkpoint=path)
    assert isinstance(RoutingStatsMismatchError("x"), wb.TraceModelMismatchError)
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(RoutingStatsError, match="not a readable"):
        routing_stats(session, corpus(4), max_tokens=16, progress=False, checkpoint=tmp_path / "junk.safetensors")


def test_merge_of_halves_equals_one_run(session, tmp_path):
    texts = corpus(24, seed=2)
    full = routing_stats(session, texts, batch_size=4, max_tokens=40, progress=False)
    a = routing_stats(session, texts[:12], batch_size=4, max_tokens=40, progress=False,
                      checkpoint=tmp_path / "a.safetensors")
    routing_stats(session, texts[12:], batch_size=4, max_tokens=40, progress=False,
                  checkpoint=tmp_path / "b.safetensors")
    merged = merge_routing_stats([a, tmp_path / "b.safetensors"])
    assert_same(merged, full, exact_floats=False)
    other = routing_stats(session, texts[:4], batch_size=4, max_tokens=8, progress=False)
    with pytest.raises(RoutingStatsMismatchError):
        merge_routing_stats([a, other])


@pytest.mark.slow  # starts Python subprocesses (accelerate launch / a fresh interpreter)
def test_accelerate_launch_two_processes_then_merge(session, tiny_checkpoint, tmp_path):
    """The docs/scaling.md recipe: two processes through `accelerate launch --multi_gpu` (torchrun; on a machine
    without CUDA, PartialState(cpu=True) makes them a gloo group: `--cpu` alone would start ONE process)."""
    texts = corpus(16, seed=3)
    script = tmp_path / "split.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {ROOT!r})
        import torch
        torch.set_num_threads(1)
        from accelerate import PartialState
        import workbench as wb
        from workbench.analysis.routing_stats import routing_stats
        state = PartialState(cpu=not torch.cuda.is_available())
        s = wb.load({str(tiny_checkpoint("gpt_oss"))!r}, preset="cpu")
        with state.split_between_processes({texts!r}) as part:
            routing_stats(s, part, batch_size=4, max_tokens=40, progress=False,
                          checkpoint=f"{tmp_path}/part{{state.process_index}}.safetensors")
        state.wait_for_everyone()
    """))
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    done = subprocess.run([accelerate, "launch", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
                           "no", "--dynamo_backend", "no", "--multi_gpu", str(script)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    parts = [tmp_path / f"part{i}.safetensors" for i in range(2)]
    assert [RoutingStats.load(p).texts for p in parts] == [8, 8]
    full = routing_stats(session, texts, batch_size=4, max_tokens=40, progress=False)
    assert_same(merge_routing_stats(parts), full, exact_floats=False)


MEMORY_SCRIPT = """
import resource, sys
sys.path.insert(0, {root!r})
import torch
torch.set_num_threads(1)
import workbench as wb
from workbench.analysis.routing_stats import routing_stats
words = {words!r}
def texts(n):  # a generator: the corpus never exists as a whole
    for i in range(n):
        yield " ".join(words[(i * 7 + j * 3) % len(words)] for j in range(40 + i % 60))
s = wb.load({path!r}, preset="cpu")
routing_stats(s, texts(16), batch_size=8, max_tokens=128, progress=False)  # warm the allocator and caches
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
st = routing_stats(s, texts({n}), batch_size=8, max_tokens=128, progress=False)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(st.texts, (after - before) * 1024)
"""


@pytest.mark.slow  # starts Python subprocesses (accelerate launch / a fresh interpreter)
def test_memory_flat_when_the_corpus_grows_tenfold(tiny_checkpoint):
    """Peak RSS growth during the call, 30 vs 300 texts (~3.5k vs ~37k tokens), each in a fresh process.

    Big allocations go through mmap (MALLOC_MMAP_THRESHOLD_) so freed tensors leave the peak instead of
    fragmenting the heap: measured here, growth is < 1 MB either way, while keeping each batch's routing
    (a leak proportional to the corpus) adds ~7 MB at 300 texts.
    """
    def peak_growth(n):
        code = MEMORY_SCRIPT.format(root=ROOT, words=WORDS, path=str(tiny_checkpoint("gpt_oss")), n=n)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                             env={**os.environ, "HF_HUB_OFFLINE": "1", "MALLOC_MMAP_THRESHOLD_": "65536"})
        assert out.returncode == 0, out.stderr[-2000:]
        texts, grown = out.stdout.split()[-2:]
        assert int(texts) == n
        return int(grown)

    small, large = peak_growth(30), peak_growth(300)
    assert large <= small + 3 * 2**20, (small, large)  # +3 MB at most for 10x the texts


def test_disk_offloaded_layers(tiny_checkpoint, tmp_path):
    """device_map with layers on disk: accelerate keeps their routers on "meta" until the router runs."""
    from transformers import AutoModelForCausalLM

    path = str(tiny_checkpoint("gpt_oss"))
    s = wb.load(path, preset="bf16")
    texts = corpus(8, seed=4)
    ref = routing_stats(s, texts, batch_size=4, max_tokens=32, progress=False)
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.layers.2": "cpu", "model.layers.3": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu",
                  "lm_head": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map=device_map,
                                                 offload_folder=str(tmp_path), attn_implementation="eager").eval()
    assert model.model.layers[1].mlp.router.weight.device.type == "meta"
    offloaded = wb.Session(model=model, tokenizer=s.tokenizer, adapter=s.adapter, report=s.report)
    assert_same(routing_stats(offloaded, texts, batch_size=4, max_tokens=32, progress=False), ref)
    with offloaded.ablate_experts({1: [0]}):
        assert routing_stats(offloaded, texts, batch_size=4, max_tokens=32, progress=False).expert_load[1, 0] == 0
    assert model.model.layers[1].mlp.router.weight.device.type == "meta"  # put back after each use


def test_trace_of_disk_offloaded_layers_equals_the_plain_model(tiny_checkpoint, tmp_path):
    """The capture reads routers kept on "meta" by accelerate the same way routing_stats does."""
    from transformers import AutoModelForCausalLM

    path = tiny_checkpoint("gpt_oss")
    s = wb.load(str(path), preset="cpu")
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.layers.2": "cpu", "model.layers.3": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu",
                  "lm_head": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, device_map=device_map,
                                                 offload_folder=str(tmp_path), attn_implementation="eager").eval()
    offloaded = wb.Session(model=model, tokenizer=s.tokenizer, adapter=s.adapter, report=s.report)
    a, b = s.trace("the cat sat on the mat"), offloaded.trace("the cat sat on the mat")
    assert torch.equal(a.routing.indices, b.routing.indices)
    assert torch.equal(a.routing.logits, b.routing.logits)
