"""gpt-oss-nano, the trained tiny gpt-oss shipped in workbench/fixtures/nano: loading, harmony, arithmetic,
routing specialisation, and what happens when the checkpoint on disk is missing or damaged.

Thresholds come from eval.json (what scripts/nano/evaluate.py measured at training time) and from the
untrained initialisation's figures in it, never from numbers copied into this file."""
import json
import math
import re
import shutil

import pytest

import workbench as wb
from workbench.analysis import behaviour
from workbench.errors import ModelNotFoundError
from workbench.fixtures import nano_path
from workbench.fixtures import nano as nano_module


@pytest.fixture(scope="module")
def nano():
    return wb.load(str(nano_path()), preset="cpu")


@pytest.fixture(scope="module")
def measured():
    return nano_module.evaluation()


@pytest.fixture(scope="module")
def held():
    return nano_module.heldout()


# ---- the artefact --------------------------------------------------------------------------------

def test_both_layouts_exist_and_fit_the_size_budget():
    total = 0
    for layout in nano_module.LAYOUTS:
        folder = nano_path(layout)
        for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json",
                     "chat_template.jinja"):
            assert (folder / name).is_file(), f"{layout}/{name}"
        total += sum(f.stat().st_size for f in folder.iterdir())
    assert total <= 25 * 10**6
    mx = json.loads((nano_path("mxfp4") / "config.json").read_text())
    assert mx["quantization_config"]["quant_method"] == "mxfp4"
    from safetensors import safe_open
    with safe_open(nano_path("mxfp4") / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "model.layers.0.mlp.experts.gate_up_proj_blocks" in keys
    assert "model.layers.0.mlp.experts.down_proj_scales" in keys
    assert "model.layers.0.mlp.experts.gate_up_proj" not in keys


def test_config_is_gpt_oss_scaled_down():
    c = json.loads((nano_path() / "config.json").read_text())
    assert c["architectures"] == ["GptOssForCausalLM"] and c["model_type"] == "gpt_oss"
    assert c["layer_types"] == ["sliding_attention", "full_attention"] * (c["num_hidden_layers"] // 2)
    assert c["head_dim"] == 64 and c["num_key_value_heads"] < c["num_attention_heads"]
    assert (c.get("rope_parameters") or c.get("rope_scaling"))["rope_type"] == "yarn"
    g = json.loads((nano_path() / "generation_config.json").read_text())
    tok = json.loads((nano_path() / "tokenizer_config.json").read_text())
    assert tok["eos_token"] == "<|return|>" and tok["bos_token"] == "<|startoftext|>"
    assert len(g["eos_token_id"]) == 3  # <|return|>, <|endoftext|>, <|call|>


# ---- loading -------------------------------------------------------------------------------------

def test_loads_as_gpt_oss_with_its_real_adapter(nano):
    assert type(nano.model).__name__ == "GptOssForCausalLM"
    assert nano.adapter.family == "gpt-oss"
    assert "gpt-oss" in repr(nano)
    assert nano.report.preset == "cpu" and nano.report.fallback is None
    assert nano.harmony


@pytest.mark.parametrize("layout,preset", [("bf16", "bf16"), ("mxfp4", "mxfp4")])
def test_loads_under_bf16_and_mxfp4_presets(layout, preset):
    s = wb.load(str(nano_path(layout)), preset=preset)
    assert s.adapter.family == "gpt-oss" and s.report.preset == preset
    if layout == "mxfp4":
        assert s.report.requested_quantization == "mxfp4"
        # On a machine without the mxfp4 kernels transformers dequantizes; the report must say so.
        assert s.report.actual_quantization == "mxfp4" or "bf16" in (s.report.fallback or "")
    t = s.trace("What is 23 + 19?", what=["routing"])
    assert t.routing.indices.shape[0] == s.model.config.num_hidden_layers


# ---- harmony and arithmetic -------------------------------------------------------------------------

def test_answers_a_held_out_sum_in_harmony_form(nano, held):
    assert [23, 19] in held["heldout_sums"]  # never seen in training
    g = nano.chat("What is 23 + 19?", temperature=0, max_new_tokens=200)
    assert [m["channel"] for m in g.messages] == ["analysis", "final"]
    assert g.token_ids[-1] == nano.tokenizer.convert_tokens_to_ids("<|return|>")
    assert re.search(r"Ones: \d \+ \d = \d+, write \d, carry \d\.", g.channels["analysis"])
    assert re.fullmatch(r"\d+", g.channels["final"].strip())
    assert g.text.strip() == g.channels["final"].strip()


def _binomial_floor(p: float, n: int) -> float:
    """Three standard deviations below the measured accuracy p for n questions (never below 0)."""
    return max(0.0, p - 3 * math.sqrt(p * (1 - p) / n))


def test_held_out_sums_at_the_measured_accuracy(nano, measured, held):
    """48 held-out sums at medium effort, answered in one batch: right at no less than three standard deviations
    below the accuracy evaluate.py measured on every held-out pair at medium effort."""
    p = measured["targets"]["heldout_sums"]["by_effort"]["medium"]["correct"]
    sums = held["heldout_sums"][::21][:48]
    answers = behaviour.ask(nano, [f"What is {a} + {b}?" for a, b in sums], reasoning_effort="medium")
    assert sum(answers.form_ok) == len(sums)
    assert answers.accuracy([a + b for a, b in sums]) >= _binomial_floor(p, len(sums))


def test_capitals_at_the_measured_accuracy(nano, measured, held):
    p = measured["targets"]["capitals_trained_phrasing"]["correct"]
    caps = held["capital_questions"]
    answers = behaviour.ask(nano, [c["question"] for c in caps], reasoning_effort="low")
    assert answers.accuracy([c["answer"] for c in caps]) >= _binomial_floor(p, len(caps))


@pytest.mark.parametrize("phrasing", ["trained", "unseen"])
def test_tool_calls_at_the_measured_accuracy(nano, measured, held, phrasing):
    """Held-out tool questions asked with their tools, each at its own effort: the right function with JSON arguments
    equal to the question's, at no less than three standard deviations below what evaluate.py measured (the
    held-out mix for the trained phrasings; its own questions for the phrasings no training conversation uses)."""
    if phrasing == "trained":
        p, qs = measured["harmony"]["tool_call_correct_share"], held["tool_questions"]
    else:
        p, qs = (measured["targets"]["tool_calls_unseen_phrasing"]["correct"],
                 held["tool_questions_unseen_phrasing"])
    right = []
    for effort in ("low", "medium", "high"):
        group = [q for q in qs if q["effort"] == effort]
        calls = behaviour.call_tools(nano, [q["question"] for q in group], [q["tools"] for q in group],
                                     reasoning_effort=effort)
        right += calls.right([(q["tool"], q["arguments"]) for q in group])
    assert len(right) == len(qs) >= 90
    assert sum(right) / len(right) >= _binomial_floor(p, len(right))


def test_measured_targets_are_recorded_with_their_goals(measured, held):
    """What evaluate.py measured for each target is in eval.json, on the question counts the card states."""
    t, h = measured["targets"], measured["harmony"]
    assert t["heldout_sums"]["by_effort"]["medium"]["n"] == measured["heldout"]["sums_held_out"]
    assert {"low", "medium", "high"} <= set(t["heldout_sums"]["by_effort"])
    assert t["capitals_trained_phrasing"]["n"] == 3 * len(held["capital_questions"])
    for share in (h["harmony_form_share"], h["tool_call_correct_share"], t["capitals_trained_phrasing"]["correct"]):
        assert 0.0 <= share <= 1.0
    assert h["harmony_form_share"] >= 0.95


def test_the_expert_the_sums_need_breaks_them_and_its_layer_mates_do_not(nano, measured):
    """Notebook 06's claim, re-measured on 32 of the sums evaluate.py used: with the expert whose absence cost the
    most switched off, fewer sums are right than with any of the two least harmful experts of its layer off."""
    ab = measured["expert_ablation"]
    layer, needed = ab["needed"]["layer"], ab["needed"]["expert"]
    row = ab["accuracy_with_expert_off"][layer]
    assert ab["needed"]["accuracy"] < min(a for e, a in enumerate(row) if e != needed)
    controls = sorted((e for e in range(len(row)) if e != needed), key=lambda e: -row[e])[:2]
    pairs = ab["pairs"][::2][:32]
    questions, expected = [f"What is {a} + {b}?" for a, b in pairs], [a + b for a, b in pairs]

    def accuracy_without(e):
        with nano.ablate_experts({layer: [e]}):
            return behaviour.ask(nano, questions).accuracy(expected)

    off = accuracy_without(needed)
    assert off < min(accuracy_without(e) for e in controls)
    assert off < behaviour.ask(nano, questions).accuracy(expected)


def test_measured_harmony_form_meets_the_goal(measured):
    assert measured["harmony"]["harmony_form_share"] >= 0.95


# ---- routing specialisation and sinks -----------------------------------------------------------------

def test_routing_specialises_beyond_the_initialisation(nano, measured, held):
    """MI(token kind; top-1 expert), re-measured on the held-out sequences of eval.json's test subset (the first
    sequence of each data kind), must clear the point midway between the initialisation's and the trained model's
    MI measured there at the layer where training raised it most."""
    measured_here = measured["routing_and_sinks"]
    if "test_subset" in measured_here:
        sub = measured_here["test_subset"]
        trained, init = sub["trained_mi_bits_per_layer"], sub["init_mi_bits_per_layer"]
    else:  # the card's own measurement: every held-out trace sequence
        sub = {"sequence_indices": range(len(held["trace_sequences"]))}
        trained = measured_here["trained"]["mi_bits_per_layer"]
        init = measured_here["init"]["mi_bits_per_layer"]
    best = max(range(len(trained)), key=lambda layer: trained[layer] - init[layer])
    threshold = (trained[best] + init[best]) / 2
    assert trained[best] > init[best]
    kinds, experts = [], []
    for i in sub["sequence_indices"]:
        ids = held["trace_sequences"][i]
        t = nano.trace(ids, what=["routing"], layers=[best])
        kinds += nano_module.token_kinds(nano.tokenizer, ids)
        experts += t.routing.at(best).indices[:, 0].tolist()
    assert nano_module.mutual_information(kinds, experts) > threshold


def test_token_kinds():
    assert [nano_module.token_kind(s) for s in ("42", " the", "  ", "):", ".", "_x")] == \
        ["digit", "word", "whitespace", "code_symbol", "punctuation", "word"]
    assert nano_module.token_kind("<|start|>", special=True) == "harmony_special"
    assert nano_module.mutual_information([0, 0, 1, 1], [5, 5, 6, 6]) == pytest.approx(1.0)
    assert nano_module.mutual_information([0, 1, 0, 1], [5, 5, 6, 6]) == pytest.approx(0.0)


def test_sink_mass_is_a_share_per_head(nano):
    t = nano.trace("The quick brown fox jumps over the lazy dog. " * 4, what=["attention"])
    m = t.sink_mass
    cfg = nano.model.config
    assert m.shape[:2] == (cfg.num_hidden_layers, cfg.num_attention_heads)
    assert float(m.min()) >= 0.0 and float(m.max()) <= 1.0


def test_stream_interventions_routing_stats_and_widget_run_on_nano(nano):
    deltas = list(nano.stream("What is 2 + 3?", temperature=0, max_new_tokens=60))
    assert deltas and {d.channel for d in deltas} <= {"analysis", "final", "commentary"}
    with nano.ablate_experts({1: [0, 1]}):
        t = nano.trace("What is 2 + 3?", what=["routing"])
    assert not ((t.routing.indices[1] == 0) | (t.routing.indices[1] == 1)).any()
    stats = nano.routing_stats(["def f(x):\n    return x + 1\n", "The cat sat on the mat. 12 + 30 = 42."])
    assert stats.tokens > 0 and int(stats.expert_load.sum()) == stats.tokens * nano.model.config.num_hidden_layers * 2
    assert nano.widget() is not None


# ---- bad input -------------------------------------------------------------------------------------------

def test_default_model_for_moe_is_nano_without_a_gpu_and_unknown_kinds_are_listed():
    from workbench.errors import WorkbenchError
    from workbench.model import hardware

    if not hardware.gpus():
        assert wb.default_model("moe") == wb.default_model("routing") == str(nano_path())
    with pytest.raises(WorkbenchError, match=r"default_model\('mixture'\): unknown kind\. Kinds: 'chat': .*'attention': "
                                             r".*'moe': gpt-oss-nano.*'routing'"):
        wb.default_model("mixture")


def test_unknown_layout_lists_the_valid_ones():
    with pytest.raises(ValueError, match="'bf16', 'mxfp4'"):
        nano_path("fp8")


@pytest.fixture()
def copy_of_nano(tmp_path):
    root = tmp_path / "nano"
    root.mkdir()
    shutil.copytree(nano_path(), root / "bf16")
    shutil.copy(nano_module.NANO_DIR / "MANIFEST.json", root / "MANIFEST.json")
    return root


def test_a_copy_verifies(copy_of_nano):
    assert nano_path(root=copy_of_nano) == copy_of_nano / "bf16"


def test_missing_file_names_the_rebuild_command(copy_of_nano):
    (copy_of_nano / "bf16" / "config.json").unlink()
    with pytest.raises(ModelNotFoundError, match=r"config\.json.*python scripts/nano/train\.py"):
        nano_path(root=copy_of_nano)


def test_corrupted_weights_are_caught(copy_of_nano):
    f = copy_of_nano / "bf16" / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte flipped
    f.write_bytes(bytes(data))
    with pytest.raises(nano_module.NanoCheckpointError, match=r"corrupted.*python scripts/nano/train\.py"):
        nano_path(root=copy_of_nano)


def test_truncated_weights_are_caught(copy_of_nano):
    f = copy_of_nano / "bf16" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(ModelNotFoundError, match="wrong size"):
        nano_path(root=copy_of_nano)


def test_missing_folder_or_manifest(tmp_path, copy_of_nano):
    with pytest.raises(ModelNotFoundError, match="MANIFEST.json is missing.*python scripts/nano/train.py"):
        nano_path(root=tmp_path / "nowhere")
    shutil.rmtree(copy_of_nano / "bf16")
    with pytest.raises(ModelNotFoundError, match="missing"):
        nano_path(root=copy_of_nano)
    (copy_of_nano / "MANIFEST.json").write_text("{not json")
    with pytest.raises(ModelNotFoundError, match="unreadable"):
        nano_path(root=copy_of_nano)


def test_an_older_nano_is_refused_by_version(copy_of_nano):
    manifest = json.loads((copy_of_nano / "MANIFEST.json").read_text())
    manifest.pop("nano_version")                    # version 1 wrote no version
    (copy_of_nano / "MANIFEST.json").write_text(json.dumps(manifest))
    with pytest.raises(nano_module.NanoCheckpointError, match=rf"version 1 .*expect version {nano_module.NANO_VERSION}.*python scripts/nano/train\.py"):
        nano_path(root=copy_of_nano)


def test_a_nano_of_another_shape_is_refused_naming_the_difference(copy_of_nano):
    config_file = copy_of_nano / "bf16" / "config.json"
    config = json.loads(config_file.read_text())
    config["num_local_experts"] = 16
    config_file.write_text(json.dumps(config))
    manifest = json.loads((copy_of_nano / "MANIFEST.json").read_text())
    manifest["layouts"]["bf16"]["config.json"] = {"sha256": nano_module._sha256(config_file),
                                                  "bytes": config_file.stat().st_size}
    (copy_of_nano / "MANIFEST.json").write_text(json.dumps(manifest))
    with pytest.raises(nano_module.NanoCheckpointError, match=r"num_local_experts is 16 where nano has 8"):
        nano_path(root=copy_of_nano)
