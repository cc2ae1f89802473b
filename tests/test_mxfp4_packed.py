"""The packed MXFP4 path (workbench/model/mxfp4_packed.py) against transformers' dequantize-everything path.

References, both independent of the packed code: transformers' `convert_moe_packed_tensors` (its dequantizer)
and `from_pretrained(..., quantization_config=Mxfp4Config(dequantize=True))`, which is what preset "bf16" loads
from an MXFP4 checkpoint. Models: the tiny gpt-oss MXFP4 fixture, gpt-oss-nano's MXFP4 folder when it is there,
and a wider random gpt-oss (hidden 1024) written by benchmarks/random_gpt_oss.py, where the default matmul
layout changes the summation order enough to show (the fixtures are too narrow for it to change a bit).
"""
import json
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

import workbench as wb
from workbench import fixtures
from workbench.errors import PresetError
from workbench.inspect.routing import routed_forward
from workbench.model import hardware, mxfp4_packed, planning
from workbench.model.mxfp4_packed import (
    PATH_PACKED,
    expert_cache,
    transformers_arithmetic,
)

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from random_gpt_oss import gpt_oss_config, write_random_mxfp4

GB = 10**9
TEXT = "The quick brown fox jumps over the lazy dog. Experts, routers and sinks: one, two, three!"


def nano_mxfp4():
    try:
        from workbench.fixtures.nano import nano_path

        return nano_path("mxfp4")
    except Exception as e:  # being built by another engineer: skip cleanly until it is there
        pytest.skip(f"gpt-oss-nano mxfp4 checkpoint not available: {e}")


@pytest.fixture(scope="module")
def wide_path(tmp_path_factory):
    config = gpt_oss_config("tiny", hidden_size=1024, intermediate_size=1024, num_attention_heads=8, head_dim=64,
                            vocab_size=2048, num_hidden_layers=4, layer_types=["sliding_attention", "full_attention"] * 2)
    return write_random_mxfp4(config, tmp_path_factory.mktemp("wide") / "gpt-oss-wide", seed=0)


_sessions: dict = {}


def session(path, preset: str, **kwargs):
    key = (str(path), preset, tuple(sorted(kwargs.items())))
    if key not in _sessions:
        _sessions[key] = wb.load(str(path), preset=preset, **kwargs)
    return _sessions[key]


def model_path(name):
    return fixtures.tiny_checkpoint("gpt_oss", mxfp4=True) if name == "tiny" else nano_mxfp4()


def ids_for(s, n=64, seed=0):
    return torch.randint(0, s.model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(seed))


def logits_and_routing(s, ids):
    out, routed = routed_forward(s.model, s.adapter, input_ids=ids)
    return out.logits, {layer: r.indices for layer, r in routed.items()}


# ---- the dequantizer -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_dequantize_equals_transformers_for_every_byte_and_scale(dtype):
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (512, 3, 16), dtype=torch.uint8, generator=g)
    blocks[:256, 0, 0] = torch.arange(256, dtype=torch.uint8)  # every byte ...
    scales = torch.arange(512 * 3).remainder(256).to(torch.uint8).view(512, 3)  # ... and every scale
    ours = mxfp4_packed.dequantize(blocks, scales, dtype)
    theirs = convert_moe_packed_tensors(blocks[None], scales[None], dtype=dtype)[0]  # [in, out]
    bits = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}[dtype]
    assert ours.shape == (512, 96) and ours.dtype == dtype
    assert torch.equal(ours.t().contiguous().view(bits), theirs.view(bits))  # bit for bit, NaN and inf included


# ---- exactly the same model ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tiny", "nano"])
def test_packed_path_is_the_dequantized_model(name):
    """transformers' arithmetic: bit-identical logits and routing. Default layout: also bit-identical on these
    narrow fixtures (hidden <= 128: the summation order does not change a bit)."""
    path = model_path(name)
    packed, dequantized = session(path, "mxfp4"), session(path, "bf16")
    assert packed.report.mxfp4_path == PATH_PACKED and dequantized.report.mxfp4_path == "dequantized"
    ids = ids_for(packed, 96)
    ref_logits, ref_routing = logits_and_routing(dequantized, ids)
    with transformers_arithmetic(packed.model):
        exact_logits, exact_routing = logits_and_routing(packed, ids)
    logits, routing = logits_and_routing(packed, ids)
    assert torch.equal(exact_logits, ref_logits) and torch.equal(logits, ref_logits)
    for layer, indices in ref_routing.items():
        assert torch.equal(exact_routing[layer], indices) and torch.equal(routing[layer], indices)
    t, u = packed.trace(TEXT, what=["routing"]), dequantized.trace(TEXT, what=["routing"])
    assert torch.equal(t.routing.indices, u.routing.indices)


@pytest.mark.slow  # ~40 s of CPU: transformers' own bf16 expert matmuls are slow on this CPU
def test_wide_model_bitwise_with_transformers_arithmetic_and_bounded_by_bf16_rounding_without(wide_path):
    """At hidden 1024 the default arithmetic (float32 matmuls on the CPU, on the same bf16 values) sums each dot
    product in another order than transformers' bf16 x @ W: the bound is bf16 rounding itself. The packed path's
    logits differ from transformers' bf16 model by less than that model differs from float32 (the same weights
    in float32, preset "cpu"), and both are equally far from float32."""
    packed, dequantized, f32 = (session(wide_path, p) for p in ("mxfp4", "bf16", "cpu"))
    ids = ids_for(packed, 48)
    ref, ref_routing = logits_and_routing(dequantized, ids)
    with transformers_arithmetic(packed.model):
        exact, exact_routing = logits_and_routing(packed, ids)
    assert torch.equal(exact, ref) and all(torch.equal(exact_routing[i], r) for i, r in ref_routing.items())
    fast, fast_routing = logits_and_routing(packed, ids)
    full, full_routing = logits_and_routing(f32, ids)
    fast_vs_ref = (fast.float() - ref.float()).abs().max()
    ref_vs_f32, fast_vs_f32 = ((x.float() - full).abs().max() for x in (ref, fast))
    # Plain path (float32 matmuls): measured 0.031 vs 0.308 (logits up to 4.75). The C++ kernel's prefill GEMM runs in
    # bf16 on CPUs with bf16 instructions, like transformers' own: there the difference can be exactly 0.
    assert fast_vs_ref < ref_vs_f32 / 4
    assert fast_vs_f32 <= ref_vs_f32  # measured: 0.306 vs 0.308

    def changed(a, b):  # tokens whose expert set differs, over all layers
        return sum(int((a[i].sort(-1).values != b[i].sort(-1).values).any(-1).sum()) for i in a)
    assert changed(fast_routing, ref_routing) <= changed(ref_routing, full_routing) // 2  # measured: 0 vs 9 of 192


def test_every_feature_gives_the_dequantized_results():
    """Capture (routing + attention), ablate/force/steer experts, residual steering, patching, routing_stats,
    chat and the widget."""
    path = model_path("tiny")
    packed, dequantized = session(path, "mxfp4"), session(path, "bf16")

    def run(s):
        out = {}
        t = s.trace(TEXT, what=["routing", "attention"])
        out["routing"], out["logits"] = t.routing.indices, t.routing.at(1).logits
        out["attention"] = [t.attention(layer, 0) for layer in t.attention_layers]
        for name, intervention in (("ablate", s.ablate_experts({1: [0, 1]})),
                                   ("force", s.force_experts({2: [4, 5, 6, 7]})),
                                   ("steer", s.steer_experts({3: {2: 4.0}}))):
            with intervention:
                out[name] = s.trace(TEXT, what=["routing"]).routing.indices
        with s.steer(torch.ones(s.model.config.hidden_size), 1, scale=0.5):  # residual steering
            out["steered"] = s.trace(TEXT, what=["routing"]).routing.indices
        ids = s.tokenizer(TEXT)["input_ids"]
        corrupt = ids[:2] + [ids[2] + 1] + ids[3:]
        out["patch"] = s.patch(ids, corrupt, at="experts", answers=(0, 1)).scores
        out["stats"] = s.routing_stats([TEXT, TEXT[::-1], "one two"], batch_size=2, progress=False).expert_load
        out["chat"] = s.chat("Hi there", temperature=0, max_new_tokens=12).token_ids
        w = s.widget(temperature=0.0, max_new_tokens=12)
        try:
            assert w.generate("Hello")
            out["widget"] = w.wait(timeout=120).token_ids
        finally:
            w.close()
        return out

    a, b = run(packed), run(dequantized)
    assert not torch.isin(a["ablate"][1], torch.tensor([0, 1])).any()
    assert torch.equal(a["force"][2].sort(-1).values, torch.tensor([4, 5, 6, 7]).expand_as(a["force"][2]))
    for key in a:
        if isinstance(a[key], list) and a[key] and isinstance(a[key][0], torch.Tensor):
            assert all(torch.equal(x, y) for x, y in zip(a[key], b[key])), key
        elif isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


def test_each_chosen_expert_is_dequantized_once_per_forward(monkeypatch):
    monkeypatch.setenv("WORKBENCH_MXFP4_KERNEL", "0")  # the plain path (the C++ kernel: tests/test_mxfp4_kernel.py)
    s = session(model_path("tiny"), "mxfp4")
    which = {}  # data pointer of each expert's blocks -> (layer, projection, expert)
    for m in mxfp4_packed.packed_experts(s.model):
        for proj in mxfp4_packed.PROJECTIONS:
            for e in range(m.num_experts):
                which[getattr(m, f"{proj}_blocks")[e].data_ptr()] = (m.layer, proj, e)
    calls = []
    real = mxfp4_packed.dequantize
    monkeypatch.setattr(mxfp4_packed, "dequantize",
                        lambda blocks, scales, dtype: calls.append(which[blocks.data_ptr()]) or real(blocks, scales, dtype))
    for n in (1, 2, 40):
        calls.clear()
        _, routing = logits_and_routing(s, ids_for(s, n, seed=n))
        chosen = {(layer, proj, int(e)) for layer, idx in routing.items() for e in idx.unique()
                  for proj in mxfp4_packed.PROJECTIONS}
        assert sorted(calls) == sorted(chosen)  # each chosen matrix once, nothing else
        if n == 1:
            assert len(calls) == 4 * 2 * 4 < 4 * 2 * 8  # top-4 of 8 experts in 4 layers: never all of them


# ---- the expert cache ----------------------------------------------------------------------------------------
def test_expert_cache_hits_and_gives_the_same_outputs():
    path = model_path("tiny")
    plain = session(path, "mxfp4")
    cached = wb.load(str(path), preset="mxfp4", expert_cache="2MB")  # every expert of the tiny model: 1.57 MB
    cache = expert_cache(cached.model)
    assert cache.budget_bytes == 2 * 10**6 and len(cache) == 0 and cached.report.expert_cache_bytes == 2 * 10**6
    ids = ids_for(plain, 40)
    first = logits_and_routing(cached, ids)[0]
    misses = cache.misses
    assert misses == len(cache) > 0 and cache.hits == 0
    second = logits_and_routing(cached, ids)[0]
    assert cache.misses == misses and cache.hits == misses  # the second forward reads only the cache
    reference = logits_and_routing(plain, ids)[0]
    assert torch.equal(first, reference) and torch.equal(second, reference)
    assert expert_cache(plain.model) is None


def test_expert_cache_evicts_least_recently_used_within_its_budget():
    path = model_path("tiny")
    config = session(path, "mxfp4").model.config
    budget = 2 * mxfp4_packed.expert_bytes(config, 4)  # two experts' worth (float32 on the CPU), of 32 used
    s = wb.load(str(path), preset="mxfp4", expert_cache=budget)
    cache = expert_cache(s.model)
    ids = ids_for(s, 40)
    logits = logits_and_routing(s, ids)[0]
    assert cache.evictions > 0 and 0 < cache.bytes <= budget
    assert torch.equal(logits, logits_and_routing(session(path, "mxfp4"), ids)[0])
    newest = list(cache._entries)[-1]
    assert newest[0] == 3 and newest[1] == "down_proj"  # the last layer's down projections were used last


def test_plan_counts_packed_experts_the_cache_and_what_transformers_alone_would_need():
    devices = [hardware.Device("cpu", "fake CPU RAM", 64 * GB, 64 * GB), hardware.Device("disk", "disk", GB, GB)]
    p = planning.plan("openai/gpt-oss-20b", "mxfp4", devices=devices)
    bf16 = planning.plan("openai/gpt-oss-20b", "bf16", devices=devices)
    cached = planning.plan("openai/gpt-oss-20b", "mxfp4", devices=devices, expert_cache="2GB")
    assert p.mxfp4_path == PATH_PACKED and p.fallback is None and p.load_bytes == p.total_bytes
    assert abs(p.total_bytes - 13.8 * GB) < 0.05 * 13.8 * GB
    assert p.dequantized_bytes == bf16.total_bytes and abs(bf16.total_bytes - 41.8 * GB) < 0.05 * 41.8 * GB
    assert cached.need_bytes - p.need_bytes == 2 * GB == cached.expert_cache_bytes
    text = str(cached)
    assert "transformers alone" in text and "41.83 GB" in text and "expert cache" in text
    assert planning.choose_auto("openai/gpt-oss-20b", context_tokens=1024, devices=[
        hardware.Device("cpu", "24 GB", 24 * GB, 20 * GB), hardware.Device("disk", "disk", GB, GB)])[0] == "mxfp4"


def test_report_measures_the_packed_bytes_against_the_plan():
    s = session(model_path("tiny"), "mxfp4")
    r = s.report
    assert r.actual_quantization == "mxfp4" and r.fallback is None and r.mxfp4_path == PATH_PACKED
    assert set(r.dtypes_by_group["experts"]) == {"uint8 (packed 4-bit)", "bfloat16"}
    assert abs(r.total_bytes - r.planned_bytes) <= 64  # the rotary inv_freq buffers are not parameters
    assert "packed (workbench)" in str(r)
    packed_params = sum(p.numel() for n, p in s.model.named_parameters() if n.endswith(("_blocks", "_scales")))
    assert r.dtypes_by_group["experts"]["uint8 (packed 4-bit)"] == packed_params


def test_save_pretrained_writes_the_mxfp4_layout_again(tmp_path):
    path = model_path("tiny")
    s = session(path, "mxfp4")
    s.model.save_pretrained(tmp_path / "again")
    for file in ("config.json", "tokenizer.json", "chat_template.jinja"):
        if (path / file).exists() and not (tmp_path / "again" / file).exists():
            shutil.copy(path / file, tmp_path / "again" / file)
    s.tokenizer.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "config.json").read_text())["quantization_config"]["quant_method"] == "mxfp4"
    again = wb.load(str(tmp_path / "again"), preset="bf16")
    ids = ids_for(s, 32)
    assert torch.equal(logits_and_routing(again, ids)[0], logits_and_routing(session(path, "bf16"), ids)[0])


# ---- bad input -----------------------------------------------------------------------------------------------
def test_an_expert_cache_that_is_not_a_size_is_refused():
    with pytest.raises(PresetError, match="expert_cache='two gigabytes' is not a size"):
        wb.load(str(model_path("tiny")), preset="mxfp4", expert_cache="two gigabytes")


def test_an_expert_cache_smaller_than_one_expert_says_the_minimum():
    config = session(model_path("tiny"), "mxfp4").model.config
    smallest = mxfp4_packed.expert_bytes(config, 4)  # 49,152 bytes: 64x128 + 64x64 float32 (the CPU's compute dtype)
    with pytest.raises(PresetError, match=r"less than one dequantized expert \(49.2 KB, the minimum\)"):
        wb.load(str(model_path("tiny")), preset="mxfp4", expert_cache=smallest - 1)
    cpu = [hardware.Device("cpu", "fake CPU RAM", 64 * GB, 64 * GB), hardware.Device("disk", "disk", GB, GB)]
    with pytest.raises(PresetError, match="at least 99.5 MB"):  # gpt-oss-20b: 2880 x 5760 + 2880 x 2880 float32
        planning.plan("openai/gpt-oss-20b", "mxfp4", expert_cache="1MB", devices=cpu)
    assert planning.plan("openai/gpt-oss-20b", "mxfp4", expert_cache="100MB", devices=cpu).expert_cache_bytes == 10**8


def test_an_expert_cache_on_a_path_without_one_is_refused():
    with pytest.raises(PresetError, match="applies only to the packed mxfp4 path"):
        wb.load(str(model_path("tiny")), preset="bf16", expert_cache="1MB")


def _broken_copy(tmp_path, name, replace):
    source = model_path("tiny")
    folder = tmp_path / "broken"
    shutil.copytree(source, folder)
    tensors = load_file(folder / "model.safetensors")
    replace(tensors, name)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


@pytest.mark.parametrize("damage", ["missing", "mis-shaped", "not uint8"])
def test_a_checkpoint_with_bad_scales_names_the_tensor_and_loads_nothing(tmp_path, monkeypatch, damage):
    name = "model.layers.2.mlp.experts.down_proj_scales"
    fix = {"missing": lambda t, n: t.pop(n), "mis-shaped": lambda t, n: t.__setitem__(n, t[n][:, :, :1].contiguous()),
           "not uint8": lambda t, n: t.__setitem__(n, t[n].float())}[damage]
    folder = _broken_copy(tmp_path, name, fix)

    def no_weights_read():
        raise AssertionError("weights were read before the checkpoint was checked")
    monkeypatch.setattr(mxfp4_packed, "packed_model_class", no_weights_read)
    with pytest.raises(PresetError, match=name.replace(".", r"\.")) as e:
        wb.load(str(folder), preset="mxfp4")
    assert "Nothing was loaded" in str(e.value)
    assert {"missing": "has no tensor", "mis-shaped": "[8, 64, 1]", "not uint8": "F32"}[damage] in str(e.value)


# ---- the GPU suite, at tiny size on this CPU ------------------------------------------------------------------
def test_gpu_suite_runs_tiny_on_the_cpu(tmp_path):
    out = tmp_path / "suite.json"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--tiny", "--json", str(out),
                          "--workdir", str(tmp_path / "work")], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["size"] == "tiny" and result["device"] == "cpu"
    assert result["agreement"]["routing_identical"] and result["agreement"]["logits_max_abs_diff"] == 0.0
    assert set(result["footprint"]) == {"bf16", "mxfp4 packed", "mxfp4 native"}
    assert "skipped" in result["footprint"]["mxfp4 native"]  # no kernels here
    for key in ("generate", "chat", "widget"):
        assert result["decode_tokens_per_s"][key] > 0
    assert result["capture_overhead"]["routing"] > 0 and result["capture_overhead"]["attention"] > 0
    assert not (tmp_path / "work").exists() or not any((tmp_path / "work").iterdir())  # weights deleted


def test_gpu_suite_says_when_memory_is_short(tmp_path):
    out = tmp_path / "suite.json"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--tiny", "--json", str(out),
                          "--workdir", str(tmp_path / "work"), "--pretend-free", "1MB"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert "not enough memory" in result["footprint"]["bf16"]["skipped"]
    assert "not enough memory" in run.stdout
