"""Train the small TopK SAE shipped in workbench/fixtures/sae/ on a real model's residual stream.

    python scripts/train_sae.py                       # SmolLM2-135M-Instruct, residual after layer 15
    python scripts/train_sae.py --model nano --layer 2 --out workbench/fixtures/sae/nano-l2-topk16

Data (offline): the workbench's own README and docs, and the docstrings of a fixed list of Python standard
library modules (this interpreter's), cut into paragraphs of at most ~400 characters, 800 of them evenly
spaced, at most 64 tokens each. Residuals: a float32 forward that stops after layer L (checked equal to the
workbench's own trace); the first position of each text is left out (its residual norm is far larger than the
rest, the "attention sink" token). 90% of the tokens train, 10% are
held out for the figures written into the SAE's metadata and NOTES.md: normalised MSE, explained variance,
dead features, and the features whose strongest held-out activations fall on digits, code punctuation, etc.

The SAE: TopK (SAELens "topk"), d_sae features, k active per token, decoder rows kept at unit norm, b_dec
initialised at the data mean, W_enc at W_dec^T; Adam; loss = MSE + 1/32 * AuxK (OpenAI's auxiliary loss on the
top `aux_k` dead latents, so fewer features die).
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import json
import pathlib
import re
import sys
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import workbench as wb  # noqa: E402
from workbench import fixtures  # noqa: E402
from workbench.analysis.sae import SAE  # noqa: E402

STDLIB = ("datetime calendar decimal fractions statistics math random string textwrap json csv collections "
          "itertools functools pathlib os re time ipaddress uuid heapq bisect array struct codecs email.utils "
          "urllib.parse argparse logging unittest doctest inspect typing dataclasses enum shutil tempfile zipfile "
          "tarfile sqlite3 socket subprocess threading queue contextlib pprint difflib locale gettext base64 "
          "hashlib hmac secrets binascii colorsys wave fnmatch glob gzip bz2 lzma configparser tomllib html "
          "xml.dom.minidom mimetypes numbers operator copy pickle shelve platform getopt optparse timeit "
          "cProfile trace tracemalloc weakref abc io string graphlib zlib ssl selectors signal mmap").split()


def texts(limit_chars: int = 400) -> list[str]:
    """Paragraphs of the README, the docs and stdlib docstrings, deduplicated, in a fixed order."""
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    raw = [p.read_text() for p in docs]
    for name in STDLIB:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        raw.append(inspect.getdoc(module) or "")
        for attr in sorted(vars(module)):
            obj = getattr(module, attr)
            if attr.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                continue
            raw.append(inspect.getdoc(obj) or "")
    out, seen = [], set()
    for block in raw:
        for paragraph in re.split(r"\n\s*\n", block):
            paragraph = paragraph.strip()
            while len(paragraph) > 20:
                piece, paragraph = paragraph[:limit_chars], paragraph[limit_chars:]
                if piece not in seen:
                    seen.add(piece)
                    out.append(piece)
    return out


class _Stop(Exception):
    """Raised by the hook on layer L: nothing above it is needed."""


def residuals(session, corpus: list[str], layer: int, max_tokens: int) -> tuple[torch.Tensor, list[str], list[int]]:
    """[tokens, hidden] float32 residuals after `layer` (the first position of each text left out, at most
    `max_tokens` per text), the token strings and the text each token came from. The forward stops after `layer`
    (the layers above it and lm_head are about half of SmolLM2's compute); the first text is checked against the
    workbench's own trace of it."""
    model, tokenizer = session.model, session.tokenizer
    kept = []

    def stop(module, args, output):
        kept.append((output[0] if isinstance(output, tuple) else output)[0].detach().float())
        raise _Stop

    rows, strings, source = [], [], []
    handle = session.adapter.layer_list(model)[layer].register_forward_hook(stop)
    start = time.time()
    try:
        for i, text in enumerate(corpus):
            if i % 100 == 0:
                print(f"residuals: {i}/{len(corpus)} texts, {len(source)} tokens, {time.time() - start:.0f} s",
                      flush=True)
            ids = tokenizer(text)["input_ids"][:max_tokens]
            try:
                with torch.no_grad():
                    model(input_ids=torch.tensor([ids]), use_cache=False)
            except _Stop:
                pass
            rows.append(kept.pop()[1:])
            strings += [tokenizer.decode([t]) for t in ids[1:]]
            source += [i] * (len(ids) - 1)
    finally:
        handle.remove()
    ids = tokenizer(corpus[0])["input_ids"][:max_tokens]
    reference = session.trace(ids, what=["residuals"], layers=[layer], dtype=torch.float32).residual(layer)[1:]
    assert torch.equal(reference, rows[0]), "the early-stopped forward must give the trace's residuals"
    return torch.cat(rows), strings, source


def train(x: torch.Tensor, d_sae: int, k: int, steps: int, batch: int, lr: float, seed: int,
          aux_k: int, dead_after: int) -> tuple[dict, list[dict]]:
    g = torch.Generator().manual_seed(seed)
    d_in = x.shape[1]
    W_dec = torch.randn(d_sae, d_in, generator=g)
    W_dec = W_dec / W_dec.norm(dim=1, keepdim=True)
    params = {"W_enc": W_dec.T.clone(), "b_enc": torch.zeros(d_sae), "W_dec": W_dec, "b_dec": x.mean(0)}
    for p in params.values():
        p.requires_grad_(True)
    opt = torch.optim.Adam(params.values(), lr=lr)
    since_fired = torch.zeros(d_sae, dtype=torch.long)
    variance = (x - x.mean(0)).pow(2).sum(1).mean()
    log = []
    for step in range(steps):
        xb = x[torch.randint(len(x), (batch,), generator=g)]
        pre = (xb - params["b_dec"]) @ params["W_enc"] + params["b_enc"]
        values, indices = pre.topk(k, dim=-1)
        f = torch.zeros_like(pre).scatter(-1, indices, values.relu())
        x_hat = f @ params["W_dec"] + params["b_dec"]
        error = xb - x_hat
        mse = error.pow(2).sum(1).mean()
        fired = torch.zeros(d_sae, dtype=torch.bool)
        fired[indices[values > 0]] = True
        since_fired += batch
        since_fired[fired] = 0
        dead = since_fired > dead_after
        aux = torch.zeros(())
        if dead.any():  # AuxK: let the top dead latents explain the remaining error
            n = min(aux_k, int(dead.sum()))
            aux_values, aux_indices = pre.masked_fill(~dead, float("-inf")).topk(n, dim=-1)
            aux_f = torch.zeros_like(pre).scatter(-1, aux_indices, aux_values.relu())
            aux = (error.detach() - aux_f @ params["W_dec"]).pow(2).sum(1).mean() / variance
        loss = mse + aux / 32
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():  # unit-norm decoder rows: a feature's size lives in its activation
            params["W_dec"] /= params["W_dec"].norm(dim=1, keepdim=True)
        if step % 200 == 0 or step == steps - 1:
            entry = {"step": step, "mse": float(mse.detach()), "nmse": float(mse.detach() / variance),
                     "dead": int(dead.sum())}
            log.append(entry)
            print(json.dumps(entry), flush=True)
    return {n: p.detach().contiguous() for n, p in params.items()}, log


def describe(sae: SAE, x: torch.Tensor, strings: list[str]) -> tuple[dict, dict]:
    """Held-out figures, and for a few token classes the feature whose top-20 activations are most in that class."""
    f = torch.cat([sae.encode(x[a:a + 4096]) for a in range(0, len(x), 4096)])
    x_hat = torch.cat([sae.decode(f[a:a + 4096]) for a in range(0, len(x), 4096)])
    nmse = float((x - x_hat).pow(2).sum(1).mean() / (x - x.mean(0)).pow(2).sum(1).mean())
    fired = (f > 0).any(0)
    figures = {"heldout_tokens": len(x), "nmse": round(nmse, 4), "explained_variance": round(1 - nmse, 4),
               "l0": float((f > 0).sum(1).float().mean()), "dead_features": int((~fired).sum()),
               "d_sae": sae.d_sae}
    classes = {
        "digits": lambda s: bool(re.fullmatch(r"\s*\d+", s)),
        "open bracket": lambda s: s.strip() in ("(", "[", "{"),
        "newline": lambda s: "\n" in s,
        "capitalised word": lambda s: bool(re.fullmatch(r"\s?[A-Z][a-z]+", s)),
    }
    top = f.topk(20, dim=0).indices  # [20, d_sae]: positions of each feature's strongest activations
    fires = f > 0
    named = {}
    for name, member in classes.items():
        # the feature that best tells the class apart: highest F1 of "fires" against membership (many features
        # have an all-member top 20; F1 also asks that it fire on most of the class)
        is_member = torch.tensor([member(s) for s in strings])
        hits = (fires & is_member[:, None]).sum(0).float()
        precision, recall = hits / fires.sum(0).clamp(min=1), hits / is_member.sum().clamp(min=1)
        f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-9)
        best = int(f1.argmax())
        named[name] = {"feature": best, "f1": round(float(f1[best]), 3), "precision": round(float(precision[best]), 3),
                       "recall": round(float(recall[best]), 3),
                       "top20_share": round(float(is_member[top[:, best]].float().mean()), 3),
                       "base_rate": round(float(is_member.float().mean()), 3)}
    return figures, named


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2", choices=["smollm2", "nano"])
    ap.add_argument("--layer", type=int, default=None, help="default: 15 (SmolLM2's 30 layers), 1 (nano's 4)")
    ap.add_argument("--d-sae", type=int, default=1024)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--texts", type=int, default=800, help="use this many texts (evenly spaced; 0: all)")
    ap.add_argument("--max-tokens", type=int, default=64, help="tokens per text")
    ap.add_argument("--float16", action="store_true", help="store the weights in float16 (half the file)")
    ap.add_argument("--cache", default=None, help="a .pt file keeping the residuals between runs")
    ap.add_argument("--out", default=None, help="default: workbench/fixtures/sae/{model}-l{layer}-topk{k}")
    args = ap.parse_args()
    args.layer = args.layer if args.layer is not None else {"smollm2": 15, "nano": 1}[args.model]
    args.out = args.out or str(ROOT / f"workbench/fixtures/sae/{args.model}-l{args.layer}-topk{args.k}")
    torch.manual_seed(args.seed)
    path = fixtures.smollm2_path() if args.model == "smollm2" else fixtures.nano_path()
    s = wb.load(str(path), preset="cpu")
    corpus = texts()
    if 0 < args.texts < len(corpus):
        corpus = [corpus[round(i * len(corpus) / args.texts)] for i in range(args.texts)]
    start = time.time()
    if args.cache and pathlib.Path(args.cache).is_file():
        x, strings, source, collect_s = torch.load(args.cache).values()
    else:
        x, strings, source = residuals(s, corpus, args.layer, args.max_tokens)
        collect_s = time.time() - start
        if args.cache:
            torch.save({"x": x, "strings": strings, "source": source, "seconds": collect_s}, args.cache)
    held = torch.tensor([i % 10 == 0 for i in source])  # every tenth text held out
    print(f"{len(corpus)} texts, {len(x)} tokens ({int(held.sum())} held out), {collect_s:.0f} s", flush=True)
    start = time.time()
    weights, log = train(x[~held], args.d_sae, args.k, args.steps, args.batch, args.lr, args.seed,
                         aux_k=256, dead_after=200_000)
    train_s = time.time() - start
    hook = f"blocks.{args.layer}.hook_resid_post"
    sae = SAE(weights["W_enc"], weights["b_enc"], weights["W_dec"], weights["b_dec"], "topk", args.layer, hook,
              k=args.k)
    heldout = [st for st, h in zip(strings, held.tolist()) if h]
    storage = torch.float16 if args.float16 else torch.float32
    sae.metadata = {
        "model_name": {"nano": "gpt-oss-nano", "smollm2": "SmolLM2-135M-Instruct"}[args.model],
        "hook_name": hook, "trained_by": "scripts/train_sae.py",
        "data": f"{len(corpus)} paragraphs: workbench README + docs, docstrings of {len(STDLIB)} stdlib modules "
                f"(Python {sys.version.split()[0]})",
        "train_tokens": int((~held).sum()), "steps": args.steps, "batch": args.batch, "lr": args.lr,
        "seed": args.seed, "final_train_nmse": round(log[-1]["nmse"], 4), "stored_as": str(storage),
        "collect_seconds": round(collect_s), "train_seconds": round(train_s),
    }
    sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec = (t.to(storage).float() for t in (sae.W_enc, sae.b_enc, sae.W_dec,
                                                                                  sae.b_dec))
    figures, named = describe(sae, x[held], heldout)  # measured on the weights as stored
    sae.metadata.update(heldout=figures, features=named)
    out = sae.save(args.out, storage_dtype=storage)
    notes = [f"# {out.name}", "", f"TopK SAE (k={args.k}, d_sae={args.d_sae}) on {sae.metadata['model_name']}'s "
             f"residual stream after layer {args.layer} (`{hook}`), written by `python scripts/train_sae.py`.", "",
             f"- data: {sae.metadata['data']}; {sae.metadata['train_tokens']} training tokens, "
             f"{figures['heldout_tokens']} held out (every tenth text)",
             f"- training: {args.steps} steps of {args.batch} tokens, Adam lr {args.lr}, seed {args.seed}, "
             f"{round(train_s)} s on this CPU (residuals: {round(collect_s)} s)",
             f"- final training normalised MSE {log[-1]['nmse']:.4f}",
             f"- held out: normalised MSE {figures['nmse']}, explained variance {figures['explained_variance']}, "
             f"L0 {figures['l0']:.1f}, dead features {figures['dead_features']} of {args.d_sae}", "",
             "For a few token classes, the feature that best tells the class apart on held-out tokens (highest F1 "
             "of \"fires\" against membership):", ""]
    notes += [f"- {name}: feature {v['feature']} (F1 {v['f1']}: precision {v['precision']:.0%}, recall "
              f"{v['recall']:.0%}; {v['top20_share']:.0%} of its 20 strongest activations, base rate "
              f"{v['base_rate']:.1%})" for name, v in named.items()]
    (out / "NOTES.md").write_text("\n".join(notes) + "\n")
    print("\n".join(notes))


if __name__ == "__main__":
    main()
