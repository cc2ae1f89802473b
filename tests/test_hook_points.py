"""Hook points: every name reads what the model computed (equal to plain PyTorch hooks or a hand computation), reading
changes no logit, changing works by name, and bad names get answers that say what exists."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import workbench as wb
from workbench import fixtures
from workbench.errors import CaptureError, HookPointError, InterventionError
from workbench.inspect.capture import trace
from workbench.inspect.points import KINDS, PointSpace
from workbench.model.adapters import adapter_for

_sessions: dict = {}


def session(name: str) -> wb.Session:
    if name not in _sessions:
        if name == "nano":
            _sessions[name] = wb.load(str(fixtures.nano_path()), preset="bf16")
        elif name == "nano-mxfp4":
            _sessions[name] = wb.load(str(fixtures.nano_path("mxfp4")), preset="mxfp4")
        elif name in ("nano-int8", "nano-nf4"):  # bitsandbytes quantizes the Linear layers; experts are tensors
            _sessions[name] = wb.load(str(fixtures.nano_path()), preset=name.split("-")[1])
        elif name == "mixtral-nf4":
            _sessions[name] = wb.load(str(fixtures.tiny_checkpoint("mixtral")), preset="nf4")
        elif name == "smollm2":
            _sessions[name] = wb.load(str(fixtures.smollm2_path()))
        else:
            _sessions[name] = wb.load(str(fixtures.tiny_checkpoint(name)), preset="bf16")
    return _sessions[name]


def ids_of(s, text="The capital of France is Paris. What is 12 plus 34?"):
    return torch.tensor([s.tokenizer(text)["input_ids"]])


def logits(s, x):
    with torch.no_grad():
        return s.model(input_ids=x).logits


def plain_hooks(s, x, layer: int):
    """Reference values by hand-placed PyTorch hooks on the modules, no workbench code involved."""
    seen = {}
    block = s.adapter.layer_list(s.model)[layer]
    attn = s.adapter.attention_module(s.model, layer)
    mlp = s.adapter.mlp_module(s.model, layer)
    handles = [
        block.register_forward_pre_hook(lambda m, a, k: seen.__setitem__("resid_pre", (a[0] if a else k["hidden_states"]).clone()), with_kwargs=True),
        block.register_forward_hook(lambda m, a, o: seen.__setitem__("resid_post", (o[0] if isinstance(o, tuple) else o).clone())),
        block.post_attention_layernorm.register_forward_pre_hook(lambda m, a: seen.__setitem__("resid_mid", a[0].clone())),
        attn.register_forward_hook(lambda m, a, o: seen.__setitem__("attn_out", o[0].clone())),
        attn.o_proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("z", a[0].clone())),
        attn.v_proj.register_forward_hook(lambda m, a, o: seen.__setitem__("v_proj", o.clone())),
        mlp.register_forward_hook(lambda m, a, o: seen.__setitem__("mlp_out", (o[0] if isinstance(o, tuple) else o).clone())),
    ]
    try:
        with torch.no_grad():
            seen["logits"] = s.model(input_ids=x).logits
    finally:
        for h in handles:
            h.remove()
    return seen


DENSE_POINTS = ["resid_pre", "resid_mid", "resid_post", "attn.v", "attn.z", "attn.out", "mlp.out"]


@pytest.mark.parametrize("name", ["nano", "smollm2", "mixtral", "qwen3_moe", "nano-mxfp4"])
def test_points_equal_plain_hooks_and_change_nothing(name):
    s = session(name)
    x = ids_of(s)
    base = logits(s, x)
    ref = plain_hooks(s, x, 1)
    cfg = s.model.config
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    t = s.trace(x[0].tolist(), what=[f"blocks.1.{k}" for k in DENSE_POINTS] + ["logits"], dtype=None)
    assert torch.equal(logits(s, x), base)  # nothing left behind
    T = x.shape[1]
    assert torch.equal(t["blocks.1.resid_pre"], ref["resid_pre"][0])
    assert torch.equal(t["blocks.1.resid_mid"], ref["resid_mid"][0])
    assert torch.equal(t["blocks.1.resid_post"], ref["resid_post"][0])
    assert torch.equal(t["blocks.1.attn.out"], ref["attn_out"][0])
    assert torch.equal(t["blocks.1.mlp.out"], ref["mlp_out"][0])
    assert torch.equal(t["blocks.1.attn.z"], ref["z"][0].view(T, heads, -1))
    assert torch.equal(t["blocks.1.attn.v"], ref["v_proj"][0].view(T, kv, -1).transpose(0, 1))
    assert torch.equal(t["logits"], ref["logits"][0].float())
    # the residual stream adds up: resid_mid = resid_pre + attn.out, resid_post = resid_mid + mlp.out
    assert torch.equal(t["blocks.1.resid_pre"] + t["blocks.1.attn.out"], t["blocks.1.resid_mid"])
    assert torch.equal(t["blocks.1.resid_mid"] + t["blocks.1.mlp.out"], t["blocks.1.resid_post"])


@pytest.mark.parametrize("name", ["nano", "mixtral", "qwen3_moe", "olmoe", "nano-mxfp4", "nano-int8", "nano-nf4",
                                  "mixtral-nf4"])
def test_expert_points_recompose_the_mlp_output_exactly(name):
    """Each expert's rows are its routed tokens; their outputs, weighted as the router applied and summed in the
    model's slot order, equal the MLP output bit for bit; `in` is the normed stream at those positions.
    Under int8/nf4, bitsandbytes quantizes the Linear layers (attention) and leaves the experts' 3-D weight tensors
    in bf16: the expert points read those, with the quantized attention before them."""
    s = session(name)
    if name.endswith(("int8", "nf4")):
        assert s.report.actual_quantization == f"bnb-{name.split('-')[1]}"
        assert set(s.report.dtypes_by_group["experts"]) == {"bfloat16"}
        assert set(s.report.dtypes_by_group["attention"]) - {"bfloat16", "float32"}  # quantized weights (+ bf16 biases)
    x = ids_of(s)
    base = logits(s, x)
    E = s.adapter.num_experts(s.model.config)
    layer = s.adapter.moe_layers(s.model)[-1]
    what = ["routing", f"blocks.{layer}.mlp.out", f"blocks.{layer}.resid_mid"] + \
        [f"blocks.{layer}.mlp.experts.*.{st}" for st in ("in", "act", "out")]
    t = s.trace(x[0].tolist(), what=what)
    assert torch.equal(logits(s, x), base)
    r = t.routing.at(layer)
    T, k = r.indices.shape
    rows = sum(len(t.positions(f"blocks.{layer}.mlp.experts.{e}.out")) for e in range(E))
    assert rows == T * k
    out = t[f"blocks.{layer}.mlp.out"]
    stacked = torch.zeros(T, k, out.shape[-1], dtype=out.dtype)
    norm = s.adapter.layer_list(s.model)[layer].post_attention_layernorm
    with torch.no_grad():
        normed = norm(t[f"blocks.{layer}.resid_mid"].unsqueeze(0))[0]
    for e in range(E):
        pos = t.positions(f"blocks.{layer}.mlp.experts.{e}.in")
        assert torch.equal(pos, (r.indices == e).any(-1).nonzero().squeeze(1))
        assert torch.equal(t[f"blocks.{layer}.mlp.experts.{e}.in"], normed[pos].to(t[f"blocks.{layer}.mlp.experts.{e}.in"].dtype))
        assert t[f"blocks.{layer}.mlp.experts.{e}.act"].shape[0] == len(pos)
        for row, p in enumerate(pos.tolist()):
            slot = int((r.indices[p] == e).nonzero()[0, 0])
            stacked[p, slot] = t[f"blocks.{layer}.mlp.experts.{e}.out"][row]
    # the weights as the model applied them (float32 for Mixtral's router, the logits' dtype for Qwen3/OLMoE)
    recomposed = (stacked * r.weights.unsqueeze(-1)).sum(dim=1).to(out.dtype)
    assert torch.equal(recomposed, out)


@pytest.mark.parametrize("implementation", ["eager", "batched_mm", "grouped_mm"])
def test_expert_points_on_every_experts_implementation(implementation):
    path = fixtures.tiny_checkpoint("gpt_oss")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, experts_implementation=implementation).eval()
    adapter, _ = adapter_for(model.config)
    x = torch.arange(3, 19).unsqueeze(0)
    with torch.no_grad():
        base = model(input_ids=x).logits
    t = trace(model, None, adapter, x[0].tolist(), what=["routing", "blocks.2.mlp.experts.*.act", "logits"])
    assert torch.equal(t["logits"], base[0])
    assert model.config._experts_implementation == implementation  # put back
    r = t.routing.at(2)
    experts = model.model.layers[2].mlp.experts
    gate_up, down = experts.gate_up_proj, experts.down_proj
    for e in range(8):
        pos = t.positions(f"blocks.2.mlp.experts.{e}.act")
        assert torch.equal(pos, (r.indices == e).any(-1).nonzero().squeeze(1))
    # a hand computation of one expert's activation, from the recorded input rows
    t_in = trace(model, None, adapter, x[0].tolist(), what=["blocks.2.mlp.experts.3.in", "blocks.2.mlp.experts.3.act"])
    rows = t_in["blocks.2.mlp.experts.3.in"]
    with torch.no_grad():
        hand = experts._apply_gate(rows @ gate_up[3] + experts.gate_up_proj_bias[3])
    assert torch.allclose(hand, t_in["blocks.2.mlp.experts.3.act"], atol=1e-6, rtol=1e-5)
    assert down.shape[0] == 8


def test_zero_ablation_of_an_expert_equals_the_hand_computation():
    s = session("nano")
    text = "What is 12 plus 34?"
    t = s.trace(text, what=["routing", "blocks.1.mlp.experts.*.out", "blocks.1.mlp.out"])
    with s.ablate_experts({1: [2]}, mode="zero"):
        z = s.trace(text, what=["routing", "blocks.1.mlp.out"])
    r = t.routing.at(1)
    assert torch.equal(z.routing.at(1).indices, r.indices)  # routing left as it was
    T, k = r.indices.shape
    stacked = torch.zeros(T, k, t["blocks.1.mlp.out"].shape[-1], dtype=t["blocks.1.mlp.out"].dtype)
    for p in range(T):
        for slot in range(k):
            e = int(r.indices[p, slot])
            if e != 2:
                row = int((t.positions(f"blocks.1.mlp.experts.{e}.out") == p).nonzero()[0, 0])
                stacked[p, slot] = t[f"blocks.1.mlp.experts.{e}.out"][row]
    assert torch.equal((stacked * r.weights.unsqueeze(-1)).sum(1), z["blocks.1.mlp.out"])
    assert 2 in r.indices  # the expert was chosen somewhere, so the ablation did something
    assert not torch.equal(z["blocks.1.mlp.out"], t["blocks.1.mlp.out"])


def test_replay_routing_restores_the_recorded_routing_and_refuses_other_tokens():
    s = session("nano")
    text = "What is 12 plus 34?"
    x = ids_of(s, text)
    base = logits(s, x)
    t = s.trace(text, what=["routing"])
    with s.replay_routing(t):
        assert torch.equal(logits(s, x), base)  # its own routing, replayed: bit-identical
    with s.ablate_experts({1: [2]}):
        ablated = s.trace(text, what=["routing"])
        with s.replay_routing(t, layers=[1]):
            replayed = s.trace(text, what=["routing"])
    assert not torch.equal(ablated.routing.at(1).indices, t.routing.at(1).indices)
    assert torch.equal(replayed.routing.at(1).indices, t.routing.at(1).indices)
    assert torch.equal(replayed.routing.at(1).weights, t.routing.at(1).weights)
    with s.replay_routing(t, weights=False):  # recorded experts, weights from today's logits: the same here
        assert torch.equal(logits(s, x), base)
    with pytest.raises(InterventionError, match="not the trace's"):
        with s.replay_routing(t):
            s.trace("A different question entirely?", what=["routing"])
    other = session("mixtral").trace("hello", what=["routing"])
    with pytest.raises(InterventionError, match="recorded from"):
        s.replay_routing(other)


def test_set_hook_and_ablate_by_name():
    s = session("nano")
    x = ids_of(s)
    base = logits(s, x)
    seen = []
    with s.hook("blocks.2.resid_post", lambda v, hook: seen.append((hook.name, v.shape))):
        assert torch.equal(logits(s, x), base)
    assert seen == [("blocks.2.resid_post", (1, x.shape[1], 128))]
    with s.set("blocks.2.resid_post", torch.zeros(128)):
        t = s.trace(x[0].tolist(), what=["blocks.2.resid_post", "blocks.3.resid_pre"])
    assert (t["blocks.2.resid_post"] == 0).all() and (t["blocks.3.resid_pre"] == 0).all()
    with s.ablate("blocks.1.mlp.out"):
        t = s.trace(x[0].tolist(), what=["blocks.1.resid_mid", "blocks.1.resid_post"])
    assert torch.equal(t["blocks.1.resid_mid"], t["blocks.1.resid_post"])
    reference = ["The weather is sunny.", "What is 3 plus 4?"]
    with s.ablate("blocks.0.attn.out", mode="mean", reference=reference):
        t = s.trace(x[0].tolist(), what=["blocks.0.attn.out"])
    means = torch.cat([s.trace(r, what=["blocks.0.attn.out"])["blocks.0.attn.out"] for r in reference]).mean(0)
    assert torch.allclose(t["blocks.0.attn.out"], means.expand_as(t["blocks.0.attn.out"]), atol=1e-6)
    assert torch.equal(logits(s, x), base)


def test_bad_names_say_what_exists():
    nano, dense = session("nano"), session("smollm2")
    with pytest.raises(CaptureError, match="Near matches: blocks.0.resid_post"):
        nano.trace("hi", what=["blocks.0.resid_psot"])
    with pytest.raises(CaptureError, match="matches no hook point"):
        nano.trace("hi", what=["blocks.*.mlp.expert.*.out"])
    with pytest.raises(CaptureError, match="gpt-oss only"):
        dense.trace("hi", what=["blocks.0.attn.sink"])
    with pytest.raises(CaptureError, match="Mixture-of-Experts families only.*gpt-oss"):
        dense.trace("hi", what=["blocks.0.mlp.router.logits"])
    with pytest.raises(CaptureError, match="expert 9 is out of range"):
        nano.trace("hi", what=["blocks.0.mlp.experts.9.in"])
    with pytest.raises(CaptureError, match="layer 7 is out of range"):
        nano.trace("hi", what=["blocks.7.resid_post"])
    with pytest.raises(InterventionError, match="read in traces only|cannot be changed"):
        with nano.set("blocks.0.attn.pattern", 0.0):
            pass
    t = nano.trace("hi", what=["blocks.0.resid_post"])
    with pytest.raises(CaptureError, match="was not captured"):
        t["blocks.1.resid_post"]
    space = PointSpace.of(nano.model, nano.adapter)
    assert nano.points("blocks.-1.*") == [n for n in space.names() if n.startswith("blocks.3.")]
    with pytest.raises(HookPointError):
        space.parse("blocks.0")


def test_every_kind_is_documented_in_the_readme():
    from pathlib import Path

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    for kind in KINDS.values():
        assert f"`{kind.template}`" in readme, kind.template


def test_patch_steer_and_sae_take_hook_point_names():
    s = session("nano")
    clean, corrupt = ones_prompt(s, 23, 45), ones_prompt(s, 23, 46)
    by_kind = s.patch(clean, corrupt, at="attention_heads", layers=[1])
    by_name = s.patch(clean, corrupt, at="blocks.1.attn.z")
    assert torch.equal(by_kind.scores, by_name.scores)
    v = torch.randn(128, generator=torch.Generator().manual_seed(0))
    clean = "What is 23 plus 45?"
    with s.steer(v, at="blocks.2.resid_post", scale=2.0):
        a = s.trace(clean, what=["residuals"], layers=[2])
    with s.steer(v, 2, scale=2.0):
        b = s.trace(clean, what=["residuals"], layers=[2])
    assert torch.equal(a.residual(2), b.residual(2))
    with pytest.raises(wb.WorkbenchError, match="blocks.L.resid_post"):
        s.steer(v, at="blocks.2.attn.out")
    from workbench.analysis.sae import hook_layer

    assert hook_layer("blocks.3.resid_post") == 3 and hook_layer("blocks.3.resid_pre") == 2


def ones_prompt(s, a: int, b: int) -> list[int]:
    """nano's chat prompt for a + b and the start of its column-by-column analysis, up to the ones digit of b."""
    return s.render(f"What is {a} + {b}?", reasoning_effort="medium") + s.tokenizer.encode(
        f"<|channel|>analysis<|message|>Ones: {a % 10} + ", add_special_tokens=False)
