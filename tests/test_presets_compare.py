"""compare_presets: numbers equal a by-hand recomputation; impossible presets skipped; one model in memory at a time.

The released gpt-oss-20b is stored in MXFP4 and bitsandbytes refuses it, so the comparison takes a
{preset: checkpoint} mapping: bf16 and nf4 read the bf16 fixture, mxfp4 the MXFP4 fixture written from the
same seeded weights (on this CPU its experts stay packed and equal transformers' dequantized ones: the
difference is mxfp4's rounding).
"""
import gc
import math
import weakref

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

import workbench.model.loading
from workbench.analysis.presets_compare import PresetComparisonError, compare_presets

TEXTS = ["the cat sat on the mat", "seven tired dogs barked at noon under grey skies, again and again and again",
         "a"]
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def paths(tiny_checkpoint):
    return {"bf16": str(tiny_checkpoint("gpt_oss")), "mxfp4": str(tiny_checkpoint("gpt_oss", mxfp4=True))}


@pytest.fixture(scope="module")
def result(paths):
    """One comparison, with a check at every load that the previous preset's model is gone."""
    models, real_load = [], workbench.model.loading.load_model

    def load(*args, **kwargs):
        gc.collect()  # only cycles the comparison itself left; it must hold no reference
        assert all(ref() is None for ref in models), "the previous preset's model is still alive"
        session = real_load(*args, **kwargs)
        models.append(weakref.ref(session.model))
        return session

    workbench.model.loading.load_model = load
    try:
        r = compare_presets({"bf16": paths["bf16"], "mxfp4": paths["mxfp4"], "int8": paths["mxfp4"],
                             "nf4": paths["bf16"]}, texts=TEXTS, max_tokens=MAX_TOKENS)
    finally:
        workbench.model.loading.load_model = real_load
    assert len(models) == 3  # int8 failed inside load, before any model existed
    return r


def naive(path: str, preset: str):
    """from_pretrained by hand; per text: logits [T, V] float64 and the router's own top-k indices per layer."""
    kwargs = dict(dtype=torch.bfloat16, device_map="cpu", attn_implementation="eager")
    if preset == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()  # the mxfp4 fixture dequantizes here
    tokenizer = AutoTokenizer.from_pretrained(path)
    seen = {}
    hooks = [layer.mlp.router.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, out[2]))
             for i, layer in enumerate(model.model.layers)]
    out = []
    for text in TEXTS:
        ids = tokenizer(text)["input_ids"][:MAX_TOKENS]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].double()
        out.append((logits, [seen[i].clone() for i in range(len(model.model.layers))]))
    for h in hooks:
        h.remove()
    return out


def test_numbers_equal_a_naive_recomputation(result, paths):
    assert result.reference == "bf16" and result.presets == ["bf16", "mxfp4", "nf4"]
    ref = naive(paths["bf16"], "bf16")
    for preset, path in (("mxfp4", paths["mxfp4"]), ("nf4", paths["bf16"])):
        other = naive(path, preset)
        kls, same_next, top1, jac = [], 0, [0] * 4, [0.0] * 4
        for (lr, rr), (lp, rp) in zip(ref, other):
            p, logp, logq = torch.softmax(lr, -1), torch.log_softmax(lr, -1), torch.log_softmax(lp, -1)
            kls += (p * (logp - logq)).sum(-1).tolist()
            same_next += int((lr.argmax(-1) == lp.argmax(-1)).sum())
            for layer in range(4):
                for a, b in zip(rr[layer].tolist(), rp[layer].tolist()):
                    top1[layer] += a[0] == b[0]
                    jac[layer] += len(set(a) & set(b)) / len(set(a) | set(b))
        n = len(kls)
        s, per = result.summary[preset], result.per_layer[preset]
        assert n == result.tokens
        assert math.isclose(s["kl_mean"], sum(kls) / n, rel_tol=1e-4, abs_tol=1e-7)
        assert math.isclose(s["kl_max"], max(kls), rel_tol=1e-4, abs_tol=1e-7)
        assert s["top1_logits"] == same_next / n
        assert per["layer"] == [0, 1, 2, 3]
        assert per["top1_agreement"] == pytest.approx([t / n for t in top1], abs=1e-12)
        assert per["jaccard"] == pytest.approx([j / n for j in jac], abs=1e-12)
        assert s["routing_top1"] == pytest.approx(sum(top1) / (4 * n))
        assert s["kl_mean"] > 0 and min(per["jaccard"]) < 1  # the presets really differ on these weights
    assert result.summary["bf16"] == {"kl_mean": 0.0, "kl_max": 0.0, "top1_logits": 1.0, "routing_top1": 1.0,
                                      "jaccard": 1.0}


def test_reports_skips_and_views(result):
    assert set(result.skipped) == {"int8"} and "MXFP4" in result.skipped["int8"]
    assert result.reports["mxfp4"].fallback is None  # no kernels here: the experts stay packed (mxfp4_packed)
    assert result.reports["mxfp4"].mxfp4_path == "packed (workbench)"
    assert result.reports["nf4"].actual_quantization == "bnb-nf4"
    text = str(result)
    assert "skipped int8" in text and "bf16 (reference)" in text
    assert result.table().count("\n") == 3
    assert "<table>" in result._repr_html_() and "skipped <b>int8</b>" in result._repr_html_()
    assert len(result.figure().data) == 4  # top-1 and Jaccard lines for mxfp4 and nf4


def test_reference_choice_and_errors(paths):
    r = compare_presets(paths["mxfp4"], ["int8", "bf16", "mxfp4"], TEXTS[:1], max_tokens=8)
    assert r.reference == "bf16" and r.presets == ["bf16", "mxfp4"] and "int8" in r.skipped
    # both dequantize the same MXFP4 experts to bf16: identical models, identical numbers
    assert r.summary["mxfp4"]["kl_max"] == 0.0 and r.summary["mxfp4"]["jaccard"] == 1.0
    with pytest.raises(PresetComparisonError, match="no preset could load"):
        compare_presets(paths["mxfp4"], ["int8", "nf4"], TEXTS[:1])
    with pytest.raises(workbench.errors.PresetError):  # an explicit reference must load
        compare_presets(paths["bf16"], ["bf16", "mxfp4"], TEXTS[:1], reference="mxfp4")
    with pytest.raises(PresetComparisonError, match="not among"):
        compare_presets(paths["bf16"], ["bf16"], TEXTS[:1], reference="nf4")
