"""gpt-oss-nano's training script: an interrupted run continues bit-exactly with --resume, the checkpoint survives
the interrupt, and a checkpoint of another configuration (or of other late data) is refused. A tiny gpt-oss on
synthetic token streams stands in for nano, so this runs in seconds; the code under test is scripts/nano/train.py
itself."""
import importlib.util
import json
import pathlib
import sys

import pytest
import torch
from transformers import GptOssConfig

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def train_script():
    sys.path.insert(0, str(ROOT / "scripts" / "nano"))
    spec = importlib.util.spec_from_file_location("nano_train", ROOT / "scripts" / "nano" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_config():
    return GptOssConfig(vocab_size=96, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_local_experts=4,
                        num_experts_per_tok=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                        sliding_window=8, layer_types=["sliding_attention", "full_attention"],
                        router_aux_loss_coef=0.02, attn_implementation="eager")


def streams():
    g = torch.Generator().manual_seed(1)
    out = {}
    for kind in ("prose", "arith"):
        ids = torch.randint(0, 96, (4000,), generator=g, dtype=torch.int32)
        out[kind] = {"ids": ids, "starts": torch.arange(0, 4000, 50)}
    return out


class Interrupting:
    """Batches that raise KeyboardInterrupt (a Ctrl-C) when asked for batch number `at`."""

    def __init__(self, batches, at: int):
        self.inner, self.at, self.calls = batches, at, 0
        self.batch, self.seq_len, self.generator = batches.batch, batches.seq_len, batches.generator

    def next(self):
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt
        return self.inner.next()


def run(train_script, tmp, steps, *, interrupt_at=None, resume=False):
    config = tiny_config()
    model = train_script.new_model(config, seed=0)
    mix = {"prose": 0.5, "arith": 0.5}
    batches = train_script.Batches(streams(), seed=0, batch=2, seq_len=16, mix=mix)
    if interrupt_at:
        batches = Interrupting(batches, interrupt_at)
    phase = {"name": "phase1", "steps": steps, "lr": 1e-3, "warmup": 2, "final_lr_frac": 0.1, "mix": mix}
    fingerprint = train_script.run_fingerprint(config, phase, 2, 16, 0)
    state = None
    if resume:
        state = torch.load(tmp / "train_state.pt", weights_only=False)
        train_script.check_fingerprint(state["fingerprint"], fingerprint, tmp / "train_state.pt")
    train_script.train(model, batches, {}, steps=steps, lr=1e-3, warmup=2, log_path=tmp / "log.jsonl", ckpt_dir=tmp,
                       log_every=1, eval_every=10**9, fingerprint=fingerprint, ckpt_every_s=0, resume_state=state)
    return model


def test_an_interrupted_run_resumes_bit_exactly(train_script, tmp_path):
    (tmp_path / "whole").mkdir()
    whole = run(train_script, tmp_path / "whole", 6)
    part = tmp_path / "part"
    part.mkdir()
    with pytest.raises(KeyboardInterrupt):
        run(train_script, part, 6, interrupt_at=4)          # Ctrl-C while fetching the 4th batch
    saved = torch.load(part / "train_state.pt", weights_only=False)
    assert saved["step"] == 3                                # the last checkpoint is intact
    resumed = run(train_script, part, 6, resume=True)
    for (name, a), (_, b) in zip(whole.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name
    steps = [json.loads(line)["step"] for line in (part / "log.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3, 4, 5, 6]                    # no step logged twice
    assert not list(part.glob("*.tmp"))


def test_resume_from_another_configuration_is_refused(train_script, tmp_path):
    run(train_script, tmp_path, 2)
    saved = torch.load(tmp_path / "train_state.pt", weights_only=False)["fingerprint"]
    other = json.loads(json.dumps(saved))
    other["arch"]["num_local_experts"] = 8
    with pytest.raises(SystemExit, match=r"--resume refused: .*another configuration .*arch.*Start afresh"):
        train_script.check_fingerprint(saved, other, tmp_path / "train_state.pt")


def test_late_data_from_another_generator_is_regenerated_and_not_resumed(train_script, monkeypatch):
    """The late kinds (tool_hops) are generated after the tokenizer and cached in the build folder's tokens.pt:
    their fingerprint follows the generator (here: its phrasings), so train.py regenerates a stale cache, and a
    phase-2 checkpoint trained on the old data is refused rather than continued on the new."""
    import build_data

    before = build_data.late_fingerprint(0)
    assert build_data.late_fingerprint(0) == before
    monkeypatch.setitem(build_data.TOOL_TEMPLATES_HOPS, "get_weather", ("Weather in {x}?",))
    after = build_data.late_fingerprint(0)
    assert after != before
    phase = {"name": "phase2", "steps": 4, "lr": 1e-3, "warmup": 2, "final_lr_frac": 0.1, "mix": {"tool_hops": 1.0}}
    saved = train_script.run_fingerprint(tiny_config(), phase, 2, 16, 0, late_data=before)
    with pytest.raises(SystemExit, match=r"--resume refused: .*late_data: checkpoint '[0-9a-f]+', this run '[0-9a-f]+'"):
        train_script.check_fingerprint(saved, train_script.run_fingerprint(tiny_config(), phase, 2, 16, 0,
                                                                           late_data=after), pathlib.Path("x.pt"))
