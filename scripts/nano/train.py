"""gpt-oss-nano: build the data, the tokenizer and the model, train, export both layouts, evaluate.

    python scripts/nano/train.py --autocast      # every step, seeded, as the shipped nano was trained (≈ 80 minutes
                                                 # on 2 CPU cores with bf16, three phases; without --autocast: float32)
    python scripts/nano/train.py --smoke         # a one-minute run into a scratch folder, to check the pipeline
    python scripts/nano/train.py --probe         # measure training throughput (tokens/s), nothing else

Steps: build_data.py (corpus) -> byte-level BPE (8192 tokens incl. harmony specials) -> GptOssForCausalLM
(seeded init, saved as `init/` in the build folder for the evaluation) -> AdamW for a fixed number of steps per
phase (PHASES, so a rerun does the same work whatever the wall time)
-> workbench/fixtures/nano/{bf16,mxfp4}/ + train_log.jsonl + MANIFEST.json -> evaluate.py -> eval.json.
Intermediate files (corpus, token ids, init and resumable training checkpoints) go to the build folder
($NANO_BUILD or ~/.cache/gpt-oss-workbench/nano-build).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import pathlib
import random
import re
import shutil
import sys
import time

import torch

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

import build_data  # noqa: E402

FIXTURE_DIR = ROOT / "workbench" / "fixtures" / "nano"
VOCAB_SIZE = 8192          # ordinary BPE tokens + the harmony specials appended after them
SEQ_LEN = 256
BATCH = 8
# Stopping criterion: a fixed number of training steps (tokens), so a rerun does the same work whatever the wall time.
# v1 (2,252,800 tokens, prose/code 27% of the mix) learned the harmony form but not the tasks: 0.3% of held-out sums,
# 0% of capitals. v2 trains ~9x longer on a mix where the structured conversations dominate (86%), with prose and
# code kept for the routing lessons. Measured on an idle AVX-512/AMX machine with `--probe` (see the model card for
# the recorded run's time). `--resume` continues a run bit-exactly from the last checkpoint (written atomically
# every CKPT_EVERY_S seconds), so a run started in the background can be interrupted and continued later.
MIX = {"prose": 0.07, "code": 0.07, "arith": 0.40, "dates": 0.08, "lists": 0.08, "facts": 0.12, "tool": 0.18}
# Each phase (its own steps, learning-rate warm-up and mix) continues from the state the previous one ended in:
# `--resume` skips finished phases. Phase 1 is v2 (16.4 M tokens): sums, capitals and the harmony form met their
# targets, but tool arguments that are words were copied 0-3% of the time. scripts/nano/diagnose_copy.py showed why:
# no attention head looked at the question's argument from the call (multiply's digits had one), and the output rows
# of the 36 argument words had collapsed together (spread 0.3 against 1.0-1.5). At 18-35% of the batch the copy
# never formed (three retrains and two fine-tunes, scripts/nano/README.md); with tool conversations as the whole
# batch it formed within 750 steps. So phase 2 trains on tool calls alone (`tool_hops`, in eleven or twelve phrasings
# per tool: with four or five, 89% of questions in unseen phrasings were right; with these, 99.7%), and phase 3
# brings the other kinds back (tool calls kept at 30%) so that nothing phase 1 learned is lost.
TOOLS_MIX = {"tool_hops": 1.0}
REMIX = {"prose": 0.06, "code": 0.06, "arith": 0.34, "dates": 0.07, "lists": 0.07, "facts": 0.10, "tool_hops": 0.30}
PHASES = (
    {"name": "phase1", "steps": 8000, "lr": 3e-3, "warmup": 100, "final_lr_frac": 0.05, "mix": MIX, "seed_offset": 0},
    {"name": "phase2", "steps": 1000, "lr": 1e-3, "warmup": 50, "final_lr_frac": 0.05, "mix": TOOLS_MIX,
     "seed_offset": 1},
    {"name": "phase3", "steps": 750, "lr": 5e-4, "warmup": 50, "final_lr_frac": 0.05, "mix": REMIX, "seed_offset": 2},
)
CKPT_EVERY_S = 180
WARMUP = PHASES[0]["warmup"]
DEFAULT_TOKENS = sum(ph["steps"] for ph in PHASES) * BATCH * SEQ_LEN
SYNTHETIC = set(build_data.SYNTHETIC_KINDS) | set(build_data.LATE_KINDS)


# ---- tokenizer --------------------------------------------------------------------------------

def train_tokenizer(texts: list[str], out: pathlib.Path):
    """Byte-level BPE trained on the corpus; digits split one by one (as a pre-tokenizer step) so sums
    are written digit by digit; the harmony specials appended after the ordinary vocabulary (as in
    o200k_harmony), bos/eos/pad and the harmony chat template as in the real gpt-oss tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from workbench.fixtures import tokenizer as tok_module

    specials = list(tok_module.HARMONY_SPECIAL_TOKENS)
    strip = re.compile("|".join(re.escape(s) for s in specials))
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE - len(specials), min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    # The specials are single tokens: keep their spelling out of the merges.
    backend.train_from_iterator((strip.sub("\n", t) for t in texts), trainer=trainer, length=len(texts))
    backend.add_special_tokens(specials)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|startoftext|>",
                                        eos_token="<|return|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = tok_module.HARMONY_CHAT_TEMPLATE
    assert len(tokenizer) == VOCAB_SIZE, len(tokenizer)
    tokenizer.save_pretrained(out)
    return tokenizer


# ---- model ------------------------------------------------------------------------------------

def nano_config(tokenizer):
    from transformers import GptOssConfig

    layers = 4
    return GptOssConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
        num_local_experts=8, num_experts_per_tok=2, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
        sliding_window=32, layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)],
        max_position_embeddings=131072,
        rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "beta_fast": 32.0,
                         "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 4096},
        attention_bias=True, swiglu_limit=7.0, rms_norm_eps=1e-5, initializer_range=0.02,
        router_aux_loss_coef=0.02, output_router_logits=False, tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        attn_implementation="eager", dtype="bfloat16")


def new_model(config, seed: int):
    from transformers import GptOssForCausalLM

    torch.manual_seed(seed)
    model = GptOssForCausalLM(config).to(torch.float32)
    model.config.use_cache = True
    return model


def generation_config(tokenizer):
    from transformers import GenerationConfig

    ids = tokenizer.convert_tokens_to_ids  # as openai/gpt-oss-20b: eos [<|return|>, <|endoftext|>, <|call|>]
    return GenerationConfig(bos_token_id=ids("<|startoftext|>"), do_sample=True,
                            eos_token_id=[ids("<|return|>"), ids("<|endoftext|>"), ids("<|call|>")],
                            pad_token_id=ids("<|endoftext|>"))


def save_checkpoint(model, tokenizer, path: pathlib.Path, *, mxfp4: bool = False) -> None:
    """bf16 safetensors + config + generation config + tokenizer; with mxfp4 the experts as blocks/scales."""
    from workbench.fixtures.checkpoints import _quantize_experts_on_disk

    if path.exists():
        shutil.rmtree(path)
    bf16 = type(model)(model.config)
    bf16.load_state_dict(model.state_dict())
    bf16 = bf16.to(torch.bfloat16)
    bf16.config.dtype = "bfloat16"
    bf16.generation_config = generation_config(tokenizer)
    bf16.save_pretrained(path)
    tokenizer.save_pretrained(path)
    if mxfp4:
        _quantize_experts_on_disk(path)


# ---- data -------------------------------------------------------------------------------------

def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def tokenize_corpus(tokenizer, rows: list[dict]) -> dict[str, dict]:
    """Per kind: one int32 stream of every document followed by <|endoftext|>, and the document starts."""
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    out = {}
    for kind in sorted({r["kind"] for r in rows}):
        texts = [r["text"] for r in rows if r["kind"] == kind]
        ids, starts = [], []
        for i in range(0, len(texts), 512):
            for seq in tokenizer(texts[i:i + 512], add_special_tokens=False)["input_ids"]:
                starts.append(len(ids))
                ids.extend(seq)
                ids.append(eot)
        out[kind] = {"ids": torch.tensor(ids, dtype=torch.int32), "starts": torch.tensor(starts, dtype=torch.int64)}
    return out


class Batches:
    """Seeded training batches: each row picks a kind by MIX, then a window of SEQ_LEN+1 tokens. Conversations
    (synthetic kinds) are read from the start of a conversation; prose and code from any offset."""

    def __init__(self, streams, seed: int, batch: int = BATCH, seq_len: int = SEQ_LEN, mix: dict | None = None):
        mix = mix or MIX
        self.streams, self.batch, self.seq_len = streams, batch, seq_len
        self.kinds = [k for k in mix if k in streams]
        self.weights = torch.tensor([mix[k] for k in self.kinds])
        self.generator = torch.Generator().manual_seed(seed)

    def next(self) -> tuple[torch.Tensor, list[str]]:
        rows, kinds = [], []
        picks = torch.multinomial(self.weights, self.batch, replacement=True, generator=self.generator)
        for p in picks.tolist():
            kind = self.kinds[p]
            s = self.streams[kind]
            n = len(s["ids"]) - self.seq_len - 1
            if kind in SYNTHETIC:
                starts = s["starts"][s["starts"] < n]
                start = int(starts[torch.randint(len(starts), (1,), generator=self.generator)])
            else:
                start = int(torch.randint(n, (1,), generator=self.generator))
            rows.append(s["ids"][start:start + self.seq_len + 1].long())
            kinds.append(kind)
        return torch.stack(rows), kinds


def fixed_eval_batches(streams, seq_len: int = SEQ_LEN, per_kind: int = 4) -> dict[str, torch.Tensor]:
    """Held-out windows per kind, the same every time (the first windows of the test streams)."""
    out = {}
    for kind, s in streams.items():
        ids = s["ids"]
        n = min(per_kind, (len(ids) - 1) // (seq_len + 1))
        out[kind] = torch.stack([ids[i * (seq_len + 1):(i + 1) * (seq_len + 1)].long() for i in range(n)])
    return out


@torch.no_grad()
def eval_losses(model, batches) -> dict[str, float]:
    model.eval()
    out = {}
    for kind, x in batches.items():
        logits = model(input_ids=x[:, :-1]).logits
        out[kind] = float(torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), x[:, 1:].flatten()))
    model.train()
    return out


# ---- training ---------------------------------------------------------------------------------

def make_optimizer(model, lr: float, weight_decay: float = 0.1):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "norm" in name or name.endswith(("bias", "sinks")) else decay).append(p)
    # Expert matrices are 3-D parameters; embeddings and heads 2-D: all decayed.
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95), eps=1e-8,
                             fused=True)  # fused: ~1 s a step less than the default here


def lr_at(step: int, total: int, lr: float, warmup: int = WARMUP, final_frac: float = 0.1) -> float:
    """Linear warm-up, then cosine decay to final_frac * lr."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return lr * (final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * progress)))


def run_fingerprint(config, phase: dict, batch: int, seq_len: int, seed: int, late_data: str | None = None) -> dict:
    """What a checkpoint must match to be resumed: the architecture, the phase's schedule and mix, the batch shape,
    and for a phase that trains on late kinds, the version of their data (`build_data.late_fingerprint`)."""
    arch = {k: v for k, v in config.to_dict().items()
            if k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_local_experts",
                     "num_experts_per_tok", "num_attention_heads", "num_key_value_heads", "head_dim",
                     "sliding_window", "layer_types")}
    out = {"arch": arch, "phase": {k: phase[k] for k in sorted(phase)}, "batch": batch, "seq_len": seq_len,
           "seed": seed}
    if late_data is not None:
        out["late_data"] = late_data
    return out


def check_fingerprint(saved: dict | None, wanted: dict, path: pathlib.Path) -> None:
    if saved == wanted:
        return
    saved = saved or {}
    diffs = [k for k in sorted(set(saved) | set(wanted)) if saved.get(k) != wanted.get(k)]
    detail = "; ".join(f"{k}: checkpoint {saved.get(k)!r}, this run {wanted.get(k)!r}" for k in diffs)
    raise SystemExit(f"--resume refused: {path} was written by a run of another configuration ({detail}). "
                     f"Start afresh without --resume, or delete {path}.")


def save_state_atomic(state: dict, path: pathlib.Path) -> None:
    """Write to a temporary file, then rename: an interrupt (Ctrl-C, kill) leaves the previous checkpoint intact."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def train(model, batches: Batches, eval_batches, *, steps: int, lr: float, log_path: pathlib.Path,
          ckpt_dir: pathlib.Path | None, log_every: int = 25, eval_every: int = 200, autocast: bool = False,
          opt=None, warmup: int = WARMUP, final_lr_frac: float = 0.1, phase: str = "phase1", step_offset: int = 0,
          elapsed_before: float = 0.0, append: bool = False, resume_state: dict | None = None,
          fingerprint: dict | None = None, ckpt_every_s: float = CKPT_EVERY_S) -> dict:
    """One phase: `steps` AdamW steps with its own schedule; log lines count steps and tokens over all phases.

    A checkpoint (model, optimizer, the batch sampler's generator, step) is written atomically to
    `ckpt_dir/train_state.pt` every `ckpt_every_s` seconds and at the end; `resume_state` (such a checkpoint)
    continues the phase where it stopped, with the same batches and updates as an uninterrupted run."""
    opt = opt if opt is not None else make_optimizer(model, lr)
    start_step = 0
    if resume_state is not None:
        model.load_state_dict(resume_state["model"])
        opt.load_state_dict(resume_state["optimizer"])
        batches.generator.set_state(resume_state["sampler"])
        start_step = resume_state["step"]
        elapsed_before = resume_state["elapsed_s"]
        append = True
        if log_path.exists():  # drop lines logged after the checkpoint: the resumed run logs those steps again
            lines = [l for l in log_path.read_text(encoding="utf-8").splitlines()
                     if json.loads(l)["step"] <= step_offset + start_step]
            log_path.write_text("".join(l + "\n" for l in lines), encoding="utf-8")
    model.train()
    t0 = time.time()
    last_ckpt = t0
    tokens_per_step = batches.batch * batches.seq_len
    acc = {"loss": 0.0, "aux": 0.0, "n": 0, "kind_loss": {}, "kind_n": {}}

    def checkpoint(done: int) -> None:
        state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "sampler": batches.generator.get_state(),
                 "step": done, "phase": phase, "elapsed_s": elapsed_before + time.time() - t0,
                 "fingerprint": fingerprint}
        save_state_atomic(state, ckpt_dir / "train_state.pt")
        if done == steps:  # the state a later phase starts from (`--resume` skips finished phases)
            save_state_atomic(state, ckpt_dir / f"train_state_{phase}.pt")

    with open(log_path, "a" if append else "w", encoding="utf-8") as log:
        if not append:
            log.write(json.dumps({"step": 0, "tokens": 0, "eval": eval_losses(model, eval_batches)}) + "\n")
        done = start_step
        try:
            for step in range(start_step, steps):
                for g in opt.param_groups:
                    g["lr"] = lr_at(step, steps, lr, warmup, final_lr_frac)
                x, kinds = batches.next()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                    out = model(input_ids=x[:, :-1], output_router_logits=True)
                logits = out.logits.float()
                per_tok = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten(), reduction="none")
                per_row = per_tok.view(x.shape[0], -1).mean(dim=1)
                lm_loss = per_row.mean()
                loss = lm_loss + model.config.router_aux_loss_coef * out.aux_loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                acc["loss"] += float(lm_loss.detach())
                acc["aux"] += float(out.aux_loss.detach())
                acc["n"] += 1
                for k, l in zip(kinds, per_row.detach().tolist()):
                    acc["kind_loss"][k] = acc["kind_loss"].get(k, 0.0) + l
                    acc["kind_n"][k] = acc["kind_n"].get(k, 0) + 1
                done = step + 1
                if done % log_every == 0 or done == steps:
                    rec = {"step": step_offset + done, "phase": phase, "tokens": (step_offset + done) * tokens_per_step,
                           "lr": round(opt.param_groups[0]["lr"], 7),
                           "loss": round(acc["loss"] / acc["n"], 4), "aux_loss": round(acc["aux"] / acc["n"], 4),
                           "train_loss_by_kind": {k: round(acc["kind_loss"][k] / acc["kind_n"][k], 4)
                                                  for k in sorted(acc["kind_loss"])},
                           "elapsed_s": round(elapsed_before + time.time() - t0, 1)}
                    if done % eval_every == 0 or done == steps:
                        rec["eval"] = {k: round(v, 4) for k, v in eval_losses(model, eval_batches).items()}
                    log.write(json.dumps(rec) + "\n")
                    log.flush()
                    print(json.dumps(rec), flush=True)
                    acc = {"loss": 0.0, "aux": 0.0, "n": 0, "kind_loss": {}, "kind_n": {}}
                    if not math.isfinite(rec["loss"]):
                        raise FloatingPointError(f"training diverged at step {done}")
                if ckpt_dir is not None and (done == steps or time.time() - last_ckpt >= ckpt_every_s):
                    checkpoint(done)
                    last_ckpt = time.time()
        except KeyboardInterrupt:
            where = ckpt_dir / "train_state.pt" if ckpt_dir is not None else None
            msg = f"interrupted after step {done} of {steps}"
            if where is not None and where.exists():
                saved = torch.load(where, weights_only=False)["step"]
                msg += f"; the last checkpoint ({where}, step {saved}) is intact: continue with --resume"
            print(msg, flush=True)
            raise
    return {"steps": steps, "tokens": steps * tokens_per_step, "train_time_s": round(elapsed_before + time.time() - t0, 1),
            "opt": opt}


# ---- export -----------------------------------------------------------------------------------

def sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(fixture_dir: pathlib.Path) -> dict:
    """sha256 of every file of each layout, checked by workbench.fixtures.nano.nano_path."""
    from workbench.fixtures.nano import NANO_VERSION

    manifest = {"nano_version": NANO_VERSION, "layouts": {}}
    for layout in ("bf16", "mxfp4"):
        folder = fixture_dir / layout
        manifest["layouts"][layout] = {f.name: {"sha256": sha256(f), "bytes": f.stat().st_size}
                                       for f in sorted(folder.iterdir()) if f.is_file()}
    (fixture_dir / "MANIFEST.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest


def export_heldout(build: pathlib.Path, fixture_dir: pathlib.Path, test_rows: list[dict]) -> None:
    """A small held-out set shipped with the model (for tests and notebooks): held-out sums and texts."""
    held = json.loads((build / "heldout.json").read_text())
    texts = {}
    for kind in ("prose", "code") + build_data.SYNTHETIC_KINDS:
        docs = [r["text"] for r in test_rows if r["kind"] == kind]
        if kind in ("prose", "code"):
            texts[kind] = [d[:1500] for d in docs[:4]]
        else:
            texts[kind] = docs[:4]
    trained, unseen = build_data.FACT_TEMPLATES_TRAIN[0], build_data.FACT_TEMPLATE_TEST

    def shipped(q: dict) -> dict:  # a tool question as tests and notebooks ask it with call_tools
        return {"question": q["prompt"][0]["content"], "tools": q["tools"], "tool": q["tool"],
                "arguments": q["arguments"], "effort": q["effort"]}

    data = {"seed": held["seed"], "heldout_sums": held["heldout_sums"],
            "arith_questions": [f"What is {a} + {b}?" for a, b in held["heldout_sums"]],
            # Capitals are facts the model learned (every country is in training); these are the trained phrasing
            # and the phrasing it never saw.
            "capital_questions": [{"question": trained.format(c=c), "answer": a} for c, a in build_data.CAPITALS],
            "capital_questions_unseen_phrasing": [{"question": unseen.format(c=c), "answer": a}
                                                  for c, a in build_data.CAPITALS],
            "texts": texts,
            # Tool questions with their tools and expected calls (tests and notebooks ask them with call_tools).
            "tool_questions": [shipped(q) for q in held["questions"] if q["kind"] == "tool"],
            # The same, in phrasings no training conversation uses (build_data.TOOL_TEMPLATES_UNSEEN).
            "tool_questions_unseen_phrasing": [shipped(q) for q in build_data.unseen_tool_questions(held["seed"])]}
    (fixture_dir / "heldout.json").write_text(json.dumps(data, indent=0) + "\n")


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or platform.machine()


# ---- main -------------------------------------------------------------------------------------

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--build", type=pathlib.Path, default=build_data.DEFAULT_OUT)
    ap.add_argument("--out", type=pathlib.Path, default=FIXTURE_DIR)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--autocast", action="store_true", help="bf16 autocast, as the shipped nano was trained (--probe here, AMX: 5,120 vs 4,428 tokens/s in float32); off by default for CPUs without fast bf16")
    ap.add_argument("--rebuild-data", action="store_true")
    ap.add_argument("--resume", action="store_true", help="skip phases whose final state is in the build folder "
                    "(train_state_<phase>.pt) and continue from there")
    ap.add_argument("--smoke", action="store_true", help="a short run into <build>/smoke; the fixture is not touched")
    ap.add_argument("--probe", action="store_true", help="measure tokens/s over a few steps and exit")
    ap.add_argument("--skip-eval", action="store_true")
    args = ap.parse_args(argv)

    torch.set_num_threads(2)
    random.seed(args.seed)
    t_all = time.time()
    build = args.build
    build.mkdir(parents=True, exist_ok=True)
    if args.rebuild_data or not (build / "train.jsonl").exists():
        print("building the corpus ...", flush=True)
        build_data.build(build, args.seed)
    train_rows, test_rows = read_jsonl(build / "train.jsonl"), read_jsonl(build / "test.jsonl")

    tok_dir = build / "tokenizer"
    t = time.time()
    if (tok_dir / "tokenizer.json").exists() and not args.rebuild_data:
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    else:
        tokenizer = train_tokenizer([r["text"] for r in train_rows], tok_dir)
    print(f"tokenizer: {len(tokenizer)} tokens ({time.time() - t:.0f} s)", flush=True)

    ids_file = build / "tokens.pt"
    if ids_file.exists() and not args.rebuild_data:
        streams = torch.load(ids_file)
    else:
        t = time.time()
        streams = {"train": tokenize_corpus(tokenizer, train_rows), "test": tokenize_corpus(tokenizer, test_rows)}
        torch.save(streams, ids_file)
        print(f"tokenized in {time.time() - t:.0f} s", flush=True)
    late_fingerprint = build_data.late_fingerprint(args.seed)
    stale = streams.get("late_fingerprint") != late_fingerprint  # made by another version of the generator
    late = [k for k in build_data.LATE_KINDS if any(k in ph["mix"] for ph in PHASES)
            and (k not in streams["train"] or stale)]
    if late:  # kinds of later phases, tokenized with the tokenizer phase 1 trained with
        t = time.time()
        late_train, late_test = build_data.late_corpus(args.seed)
        streams["train"].update(tokenize_corpus(tokenizer, late_train))
        streams["test"].update(tokenize_corpus(tokenizer, late_test))
        streams["late_fingerprint"] = late_fingerprint
        torch.save(streams, ids_file)
        print(f"late kinds {late} tokenized in {time.time() - t:.0f} s"
              + (" (the build folder's were made by another version of build_data.py)" if stale else ""), flush=True)
    corpus_tokens = {k: len(v["ids"]) for k, v in streams["train"].items()}
    print("train tokens per kind:", corpus_tokens, flush=True)

    config = nano_config(tokenizer)
    model = new_model(config, args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters", flush=True)
    eval_batches = fixed_eval_batches(streams["test"])

    if args.probe:
        for autocast, batch in ((False, BATCH), (True, BATCH), (False, 2 * BATCH), (True, 2 * BATCH)):
            m = new_model(config, args.seed)
            b = Batches(streams["train"], args.seed, batch=batch)
            log = build / f"probe_{'bf16' if autocast else 'fp32'}_b{batch}.jsonl"
            r = train(m, b, {}, steps=12, lr=PHASES[0]["lr"], log_path=log, ckpt_dir=None, log_every=4, eval_every=10**9,
                      autocast=autocast)
            recs = [json.loads(l) for l in open(log)][1:]
            tps = (recs[-1]["tokens"] - recs[0]["tokens"]) / (recs[-1]["elapsed_s"] - recs[0]["elapsed_s"])
            print(f"probe autocast={autocast} batch={batch}: {tps:,.0f} tokens/s (steps 4..12)", flush=True)
        return

    out = build / "smoke" if args.smoke else args.out
    out.mkdir(parents=True, exist_ok=True)
    init_dir = build / ("smoke_init" if args.smoke else "init")
    save_checkpoint(model, tokenizer, init_dir)  # the untrained initialisation, for the evaluation's baselines
    opt, offset, elapsed, phases_done = make_optimizer(model, PHASES[0]["lr"]), 0, 0.0, []
    for i, ph in enumerate(PHASES):
        steps = 4 if args.smoke else ph["steps"]
        saved = build / f"train_state_{ph['name']}.pt"
        uses_late = any(k in ph["mix"] for k in build_data.LATE_KINDS)
        fingerprint = run_fingerprint(config, ph | {"steps": steps}, BATCH, SEQ_LEN, args.seed,
                                      late_fingerprint if uses_late else None)
        if args.resume and not args.smoke and saved.exists():
            state = torch.load(saved, weights_only=False)
            check_fingerprint(state.get("fingerprint"), fingerprint, saved)
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            elapsed = state["elapsed_s"]
            print(f"{ph['name']}: resumed from {saved} ({elapsed:.0f} s of training)", flush=True)
        else:
            current = build / "train_state.pt"
            resume_state = None
            if args.resume and not args.smoke and current.exists():
                resume_state = torch.load(current, weights_only=False)
                if resume_state.get("phase") != ph["name"]:
                    resume_state = None  # a checkpoint of an earlier phase, already finished above
                else:
                    check_fingerprint(resume_state.get("fingerprint"), fingerprint, current)
                    print(f"{ph['name']}: continuing from step {resume_state['step']} of {steps} ({current})", flush=True)
            r = train(model, Batches(streams["train"], args.seed + ph["seed_offset"], mix=ph["mix"]), eval_batches,
                      steps=steps, lr=ph["lr"], warmup=min(ph["warmup"], steps), final_lr_frac=ph["final_lr_frac"],
                      log_path=out / "train_log.jsonl", ckpt_dir=None if args.smoke else build,
                      autocast=args.autocast, opt=opt, phase=ph["name"], step_offset=offset, elapsed_before=elapsed,
                      append=i > 0 or (args.resume and (out / "train_log.jsonl").exists()),
                      log_every=2 if args.smoke else 25, eval_every=4 if args.smoke else 100,
                      resume_state=resume_state, fingerprint=fingerprint)
            elapsed = r["train_time_s"]
        offset += steps
        phases_done.append({k: v for k, v in ph.items()} | {"steps": steps, "elapsed_after_s": round(elapsed, 1)})
    result = {"steps": offset, "tokens": offset * BATCH * SEQ_LEN, "train_time_s": round(elapsed, 1),
              "phases": phases_done}
    result.update({"parameters": n_params, "corpus_tokens": corpus_tokens, "seed": args.seed, "lr": PHASES[0]["lr"],
                   "batch": BATCH, "seq_len": SEQ_LEN, "mix": MIX, "torch_threads": torch.get_num_threads(),
                   "autocast_bf16": args.autocast, "cpu": cpu_name(),
                   "torch": torch.__version__})
    result["tokens_by_kind_expected"] = {k: round(sum(ph["mix"].get(k, 0) * ph["steps"] for ph in phases_done)
                                                  * BATCH * SEQ_LEN)
                                        for k in dict.fromkeys(k for ph in phases_done for k in ph["mix"])}
    save_checkpoint(model, tokenizer, out / "bf16")
    save_checkpoint(model, tokenizer, out / "mxfp4", mxfp4=True)
    export_heldout(build, out, test_rows)
    write_manifest(out)
    (build / ("smoke_train_result.json" if args.smoke else "train_result.json")).write_text(json.dumps(result, indent=1))
    (out / "train_result.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("steps", "tokens", "train_time_s", "parameters")}), flush=True)
    if not args.skip_eval:
        import evaluate
        evaluate.main(["--fixture", str(out), "--build", str(build), "--init", str(init_dir)]
                      + (["--quick"] if args.smoke else []))
    print(f"total time {time.time() - t_all:.0f} s", flush=True)


if __name__ == "__main__":
    main()
