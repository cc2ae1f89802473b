"""gpt-oss-nano, step 1: the corpus. Offline text plus seeded synthetic harmony conversations.

    python scripts/nano/build_data.py [--out DIR] [--seed 0]

Writes to DIR (default $NANO_BUILD or ~/.cache/gpt-oss-workbench/nano-build):
  train.jsonl / test.jsonl   one document a line: {"kind", "text"}; kinds below
  heldout.json               held-out questions (messages, tools, effort, expected answer) for evaluate.py
  data_manifest.json         sources, licences, counts

Kinds and sources (licences recorded in MODEL_CARD.md):
  prose      Python 3.11 documentation (Debian python3-doc, HTML stripped of markup; PSF-2.0)
             and the licence texts in /usr/share/common-licenses (verbatim copying permitted)
  code       Python 3.11 standard library source (PSF-2.0), tests excluded
  arith, dates, lists, facts, tool
             generated here: harmony conversations rendered with the harmony chat template of
             workbench.fixtures.tokenizer, under all three reasoning efforts; `tool` has calls on the
             commentary channel with a recipient, a JSON tool result and a final answer.
Held out: 5% of the prose and code files; 10% of all a+b pairs (a, b in 0..99, always including 23+19),
which never appear in training; held-out dates, lists and tool arguments; one unseen phrasing of facts.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import html.parser
import json
import os
import pathlib
import random
import re
import sys
import sysconfig

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

DEFAULT_OUT = pathlib.Path(os.environ.get("NANO_BUILD") or pathlib.Path.home() / ".cache" / "gpt-oss-workbench" / "nano-build")
PY_DOC_DIRS = ("/usr/share/doc/python3.11/html", "/usr/share/doc/python3-doc/html", "/usr/share/doc/python3-dev/html")
LICENSES_DIR = "/usr/share/common-licenses"
SYNTHETIC_KINDS = ("arith", "dates", "lists", "facts", "tool")
EFFORTS = ("low", "medium", "high")
# Conversations generated for training, per kind (≈ 130 tokens each).
N_TRAIN = {"arith": 60000, "dates": 8000, "lists": 8000, "facts": 12000, "tool": 16000}
N_TEST = {"arith": 300, "dates": 100, "lists": 100, "facts": 100, "tool": 100}


# ---- offline text -----------------------------------------------------------------------------

class _TextOfHTML(html.parser.HTMLParser):
    """The readable text of a Sphinx page: the main body only, without scripts, styles or navigation."""

    SKIP = {"script", "style", "nav", "head"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.depth_skip = 0
        self.in_body = 0  # depth inside <div role="main">
        self.div_depth = 0

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP:
            self.depth_skip += 1
        if tag == "div":
            self.div_depth += 1
            if dict(attrs).get("role") == "main" and not self.in_body:
                self.in_body = self.div_depth
        if tag in ("p", "li", "h1", "h2", "h3", "h4", "pre", "dt", "dd", "tr", "br", "div"):
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag in self.SKIP and self.depth_skip:
            self.depth_skip -= 1
        if tag == "div":
            if self.in_body == self.div_depth:
                self.in_body = 0
            self.div_depth -= 1
        if tag in ("p", "li", "h1", "h2", "h3", "h4", "pre"):
            self.parts.append("\n")

    def handle_data(self, data):
        if self.in_body and not self.depth_skip:
            self.parts.append(data)


def html_to_text(source: str) -> str:
    p = _TextOfHTML()
    p.feed(source)
    text = "".join(p.parts).replace("\u00b6", "")  # Sphinx's pilcrow anchors
    lines = [re.sub(r"[ \t]+", " ", line).rstrip() for line in text.splitlines()]
    text = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def python_doc_dir() -> pathlib.Path:
    for d in PY_DOC_DIRS:
        if pathlib.Path(d, "library").is_dir():
            return pathlib.Path(d)
    raise SystemExit("The Python documentation is not installed: run `apt-get install -y python3-doc` "
                     f"(looked in {', '.join(PY_DOC_DIRS)}).")


def prose_files() -> list[tuple[str, str]]:
    """(name, text) of every prose document, sorted by name."""
    docs = python_doc_dir()
    out = []
    for f in sorted(docs.rglob("*.html")):
        if "_static" in f.parts or "_sources" in f.parts or f.name in ("genindex.html", "search.html"):
            continue
        if f.name.startswith("genindex") or f.name == "py-modindex.html":
            continue
        text = html_to_text(f.read_text(encoding="utf-8", errors="replace"))
        if len(text) > 200:
            out.append((f"pydoc/{f.relative_to(docs)}", text))
    for f in sorted(pathlib.Path(LICENSES_DIR).glob("*")):
        if f.is_file() and not f.is_symlink():
            out.append((f"licenses/{f.name}", f.read_text(encoding="utf-8", errors="replace").strip()))
    return out


def code_files() -> list[tuple[str, str]]:
    """(name, source) of the standard library's Python files (no tests, no site-packages, ≤ 200 KB each)."""
    stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    out = []
    for f in sorted(stdlib.rglob("*.py")):
        rel = f.relative_to(stdlib)
        top = rel.parts[0]
        if top in ("site-packages", "test", "idlelib", "lib2to3", "turtledemo") or "tests" in rel.parts:
            continue
        if "test" in top or f.stat().st_size > 200_000:
            continue
        out.append((f"stdlib/{rel}", f.read_text(encoding="utf-8", errors="replace")))
    return out


# ---- synthetic conversations ------------------------------------------------------------------

CAPITALS = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Portugal", "Lisbon"),
    ("Japan", "Tokyo"), ("China", "Beijing"), ("India", "New Delhi"), ("Brazil", "Brasilia"),
    ("Argentina", "Buenos Aires"), ("Canada", "Ottawa"), ("Mexico", "Mexico City"), ("Egypt", "Cairo"),
    ("Kenya", "Nairobi"), ("Nigeria", "Abuja"), ("Australia", "Canberra"), ("Russia", "Moscow"),
    ("Poland", "Warsaw"), ("Sweden", "Stockholm"), ("Norway", "Oslo"), ("Finland", "Helsinki"),
    ("Denmark", "Copenhagen"), ("Greece", "Athens"), ("Turkey", "Ankara"), ("Austria", "Vienna"),
    ("Ireland", "Dublin"), ("Peru", "Lima"), ("Chile", "Santiago"), ("Colombia", "Bogota"),
    ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"), ("Indonesia", "Jakarta"), ("Iran", "Tehran"),
    ("Iraq", "Baghdad"), ("Morocco", "Rabat"), ("Ghana", "Accra"), ("Ethiopia", "Addis Ababa"),
    ("Hungary", "Budapest"), ("Belgium", "Brussels"), ("Netherlands", "Amsterdam"), ("Switzerland", "Bern"),
    ("Cuba", "Havana"), ("Ukraine", "Kyiv"), ("Romania", "Bucharest"), ("Czechia", "Prague"),
    ("Philippines", "Manila"), ("Pakistan", "Islamabad"), ("Bangladesh", "Dhaka"), ("Nepal", "Kathmandu"),
    ("New Zealand", "Wellington"), ("South Korea", "Seoul"), ("Saudi Arabia", "Riyadh"), ("Israel", "Jerusalem"),
    ("Venezuela", "Caracas"), ("Uruguay", "Montevideo"), ("Senegal", "Dakar"), ("Tunisia", "Tunis"),
    ("Iceland", "Reykjavik"), ("Croatia", "Zagreb"), ("Serbia", "Belgrade"),
]
FACT_TEMPLATES_TRAIN = ("What is the capital of {c}?", "Which city is the capital of {c}?",
                        "Name the capital of {c}.", "What's the capital city of {c}?")
FACT_TEMPLATE_TEST = "Tell me the capital of {c}."
ARITH_TEMPLATES = ("What is {a} + {b}?", "Compute {a} + {b}.", "What is the sum of {a} and {b}?",
                   "{a} + {b} = ?", "Add {a} and {b}.", "Calculate {a} + {b}.")
WORDS = ("apple", "pear", "fig", "plum", "grape", "lemon", "melon", "cherry", "peach", "mango", "kiwi", "lime",
         "red", "blue", "green", "black", "white", "yellow", "cat", "dog", "bird", "fish", "horse", "mouse",
         "tree", "river", "stone", "cloud", "book", "chair", "table", "lamp", "door", "window", "road", "bridge")
# Tool questions: the phrasings training uses, and one per tool that no training conversation uses (evaluation).
TOOL_TEMPLATES = {"get_weather": ("What is the weather in {x}?", "How is the weather in {x} right now?"),
                  "multiply": ("What is {a} times {b}?", "Multiply {a} by {b}."),
                  "word_length": ("How many letters are in the word {x}?",)}
# tool_hops (phases 2-3) asks in many phrasings (eleven or twelve per tool), so the call follows what the question
# is about, not one sentence it was trained on.
TOOL_TEMPLATES_HOPS = {
    "get_weather": TOOL_TEMPLATES["get_weather"] + (
        "Is it raining in {x}?", "Weather in {x}, please.", "What's the forecast for {x}?",
        "Give me the weather for {x}.", "What's the weather like in {x}?", "I need the weather in {x}.",
        "Is it cold in {x} now?", "How warm is it in {x}?", "Weather report for {x}?", "Look up the weather in {x}."),
    "multiply": TOOL_TEMPLATES["multiply"] + (
        "What is {a} multiplied by {b}?", "Calculate {a} * {b}.", "{a} x {b} = ?",
        "Multiply {a} and {b}.", "Find the product of {a} and {b}.", "How much is {a} times {b}?",
        "I need {a} times {b}.", "{a} times {b}, please.", "Product of {a} and {b}?", "Work out {a} times {b}."),
    "word_length": TOOL_TEMPLATES["word_length"] + (
        "How long is the word {x}?", "What is the length of the word {x}?", "Number of letters in {x}?",
        "How many letters does the word {x} have?", "Give me the length of {x}.", "Word length of {x}?",
        "I need the number of letters in {x}.", "How many characters are in {x}?", "Find the length of the word {x}.",
        "Letters in the word {x}, please.")}
# Phrasings no training conversation uses, two per tool (evaluation only).
TOOL_TEMPLATES_UNSEEN = {"get_weather": ("Tell me the weather in {x} today.", "Can you check the weather in {x}?"),
                         "multiply": ("Compute {a} times {b}.", "What is the product of {a} and {b}?"),
                         "word_length": ("Count the letters of the word {x}.", "What is the letter count of {x}?")}
CONDITIONS = ("sunny", "cloudy", "rainy", "windy", "snowy", "foggy")
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")
TOOLS = {
    "get_weather": {"type": "function", "function": {
        "name": "get_weather", "description": "Gets the current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
    "multiply": {"type": "function", "function": {
        "name": "multiply", "description": "Multiplies two integers",
        "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                       "required": ["a", "b"]}}},
    "word_length": {"type": "function", "function": {
        "name": "word_length", "description": "Counts the letters of a word",
        "parameters": {"type": "object", "properties": {"word": {"type": "string"}}, "required": ["word"]}}},
}
DATE_LO, DATE_HI = datetime.date(2020, 1, 1), datetime.date(2027, 12, 31)


def heldout_sums(seed: int) -> set[tuple[int, int]]:
    """10% of all (a, b) with a, b in 0..99, seeded; 23 + 19 (the documented example) is always held out."""
    pairs = [(a, b) for a in range(100) for b in range(100)]
    rng = random.Random(seed * 1000 + 1)
    held = set(rng.sample(pairs, len(pairs) // 10))
    held.add((23, 19))
    return held


def arith_reasoning(a: int, b: int, effort: str) -> str:
    """Worked reasoning for a + b: the whole sum (low), column addition with carries (medium, high)."""
    total = a + b
    if effort == "low":
        return f"{a} + {b} = {total}."
    a1, a0, b1, b0 = a // 10, a % 10, b // 10, b % 10
    s0 = a0 + b0
    c0 = s0 // 10
    s1 = a1 + b1 + c0
    steps = [f"Ones: {a0} + {b0} = {s0}, write {s0 % 10}, carry {c0}."]
    steps.append(f"Tens: {a1} + {b1} + {c0} = {s1}, write {s1 % 10}, carry {s1 // 10}.")
    if s1 >= 10:
        steps.append(f"Hundreds: {s1 // 10}.")
    body = " ".join(steps) + f" So {a} + {b} = {total}."
    if effort == "medium":
        return body
    return (f"The user wants the sum of {a} and {b}. Add the digits column by column, starting with the ones. "
            + body + f" The answer is {total}.")


def _date_text(d: datetime.date) -> str:
    return d.isoformat()


def _days_in_month(d: datetime.date) -> int:
    nxt = (d.replace(day=28) + datetime.timedelta(days=4)).replace(day=1)
    return (nxt - datetime.timedelta(days=1)).day


class Synth:
    """Seeded generators of one conversation (messages, tools, effort, expected final answer) per kind."""

    def __init__(self, rng: random.Random, split: str, held_sums: set[tuple[int, int]]):
        self.rng, self.split, self.held = rng, split, held_sums

    def effort(self) -> str:
        return self.rng.choice(EFFORTS)

    def convo(self, question: str, thinking: str, answer: str, effort: str, kind: str, **extra) -> dict:
        return dict(kind=kind, effort=effort, tools=None,
                    messages=[{"role": "user", "content": question},
                              {"role": "assistant", "content": answer, "thinking": thinking}],
                    answer=answer, **extra)

    def arith(self) -> dict:
        while True:
            a, b = self.rng.randrange(100), self.rng.randrange(100)
            if ((a, b) in self.held) == (self.split == "test"):
                break
        effort = self.effort()
        template = ARITH_TEMPLATES[0] if self.split == "test" else self.rng.choice(ARITH_TEMPLATES)
        return self.convo(template.format(a=a, b=b), arith_reasoning(a, b, effort), str(a + b), effort, "arith",
                          a=a, b=b)

    def _date(self) -> datetime.date:
        # Train on even ordinal days, test on odd ones: every held-out date is unseen.
        while True:
            d = DATE_LO + datetime.timedelta(days=self.rng.randrange((DATE_HI - DATE_LO).days - 40))
            if (d.toordinal() % 2 == 1) == (self.split == "test"):
                return d

    def dates(self) -> dict:
        d, effort = self._date(), self.effort()
        if self.rng.random() < 0.5:
            wd = WEEKDAYS[d.weekday()]
            q = self.rng.choice(("What day of the week is {d}?", "Which weekday is {d}?")).format(d=_date_text(d))
            if effort == "low":
                t = f"{_date_text(d)} is a {wd}."
            else:
                t = f"{_date_text(d)} is {MONTHS[d.month - 1]} {d.day}, {d.year}. That day is a {wd}."
                if effort == "high":
                    t = "The user wants the weekday of a date. " + t + f" So the answer is {wd}."
            return self.convo(q, t, wd, effort, "dates", task="weekday")
        n = self.rng.randrange(1, 31)
        e = d + datetime.timedelta(days=n)
        q = self.rng.choice(("What date is {n} days after {d}?", "Add {n} days to {d}.")).format(n=n, d=_date_text(d))
        dim = _days_in_month(d)
        if effort == "low":
            t = f"{_date_text(d)} plus {n} days is {_date_text(e)}."
        else:
            s = d.day + n
            t = f"{MONTHS[d.month - 1]} {d.year} has {dim} days. {d.day} + {n} = {s}."
            if s <= dim:
                t += f" {s} is at most {dim}, so the month stays. The date is {_date_text(e)}."
            else:
                t += f" {s} is more than {dim}, so {s} - {dim} = {s - dim} in the next month. The date is {_date_text(e)}."
            if effort == "high":
                t = "The user wants to add days to a date. Count within the month first. " + t
        return self.convo(q, t, _date_text(e), effort, "dates", task="add_days")

    def lists(self) -> dict:
        effort, task = self.effort(), self.rng.choice(("sort", "count", "first", "last", "max"))
        if task in ("sort", "max"):
            xs = [self.rng.randrange(100) for _ in range(self.rng.randrange(3, 8))]
            shown = ", ".join(map(str, xs))
            if task == "sort":
                ans = ", ".join(map(str, sorted(xs)))
                q = f"Sort these numbers from smallest to largest: {shown}"
                t = f"Sorted: {ans}."
                if effort != "low":
                    t = f"The smallest is {min(xs)} and the largest is {max(xs)}. " + t
                if effort == "high":
                    t = f"There are {len(xs)} numbers to sort. " + t
            else:
                ans = str(max(xs))
                q = f"What is the largest number in this list: {shown}?"
                t = f"The largest is {ans}."
                if effort != "low":
                    t = f"Going through {shown}, the largest so far ends at {ans}. " + t
        else:
            ws = [self.rng.choice(WORDS) for _ in range(self.rng.randrange(2, 8))]
            shown = ", ".join(ws)
            if task == "count":
                ans = str(len(ws))
                q = f"How many items are in this list: {shown}?"
                t = " ".join(f"{w} ({i + 1})" for i, w in enumerate(ws)) + f". There are {ans} items."
                if effort == "low":
                    t = f"There are {ans} items."
            else:
                ans = ws[0] if task == "first" else ws[-1]
                q = f"What is the {task} word in this list: {shown}?"
                t = f"The {task} word is {ans}."
                if effort != "low":
                    t = f"The list has {len(ws)} words. " + t
        if effort == "high":
            t = "Let me look at the list carefully. " + t
        return self.convo(q, t, ans, effort, "lists", task=task)

    def facts(self) -> dict:
        country, capital = self.rng.choice(CAPITALS)
        effort = self.effort()
        template = FACT_TEMPLATE_TEST if self.split == "test" else self.rng.choice(FACT_TEMPLATES_TRAIN)
        t = f"The capital of {country} is {capital}."
        if effort == "high":
            t = f"The user asks about {country}. " + t + f" So the answer is {capital}."
        return self.convo(template.format(c=country), t, capital, effort, "facts")

    def tool(self, hops: bool = False, unseen_phrasing: bool = False) -> dict:
        """A tool call. `hops`: the analysis names the argument right after the question and again right before the
        call (each copy a short hop; phases 2-3); `unseen_phrasing`: the question in a phrasing no training
        conversation uses (evaluation only). The defaults draw exactly what phase 1 (nano v2) trained on."""
        effort, name = self.effort(), self.rng.choice(tuple(TOOLS))
        tools = [TOOLS[name]] + [TOOLS[n] for n in TOOLS if n != name and self.rng.random() < 0.5]
        self.rng.shuffle(tools)
        templates = TOOL_TEMPLATES_UNSEEN if unseen_phrasing else TOOL_TEMPLATES_HOPS if hops else TOOL_TEMPLATES
        if name == "get_weather":
            _, city = self.rng.choice(CAPITALS)
            args = {"city": city}
            q = self.rng.choice(templates[name]).format(x=city)
            temp, cond = self.rng.randrange(-10, 36), self.rng.choice(CONDITIONS)
            result = {"city": city, "temperature_c": temp, "condition": cond}
            answer = f"It is {cond} in {city}, {temp} degrees Celsius."
            think2 = f"The tool says {cond} and {temp} degrees."
            head, tail = f"City: {city}.", f"I should call get_weather for {city}."
            wants = f"The user wants the weather in {city}."
        elif name == "multiply":
            a, b = self.rng.randrange(10, 1000), self.rng.randrange(10, 100)
            args = {"a": a, "b": b}
            q = self.rng.choice(templates[name]).format(a=a, b=b)
            result = {"result": a * b}
            answer = str(a * b)
            think2 = f"The tool returned {a * b}."
            head, tail = f"Numbers: {a} and {b}.", f"I should call multiply with {a} and {b}."
            wants = f"The user wants {a} times {b}."
        else:
            w = self.rng.choice(WORDS)
            args = {"word": w}
            # phase 1's one phrasing drew nothing here: keep it so (its corpus is unchanged)
            q = templates[name][0].format(x=w) if len(templates[name]) == 1 else self.rng.choice(templates[name]).format(x=w)
            result = {"word": w, "length": len(w)}
            answer = f"The word {w} has {len(w)} letters."
            think2 = f"The tool says {len(w)}."
            head, tail = f"Word: {w}.", f"I should call word_length for {w}."
            wants = f"The user wants the letters of the word {w}."
        if hops:  # every copy of the argument within a few tokens of the one before it
            think1 = head + " " + tail if effort == "low" else f"{head} {wants} There is a tool for this. {tail}"
        else:
            think1 = f"I should call {name}."
            if effort != "low":
                think1 = f"The user asks: {q} There is a tool for this. " + think1
        messages = [{"role": "user", "content": q},
                    {"role": "assistant", "content": None, "thinking": think1,
                     "tool_calls": [{"type": "function", "function": {"name": name, "arguments": args}}]},
                    {"role": "tool", "content": json.dumps(result)},
                    {"role": "assistant", "content": answer, "thinking": think2}]
        return dict(kind="tool_hops" if hops else "tool", effort=effort, tools=tools, messages=messages, answer=answer,
                    tool=name, arguments=args)

    def tool_hops(self) -> dict:
        return self.tool(hops=True)


# Kinds generated after the tokenizer is trained, for later training phases: their texts are not in the tokenizer's
# corpus, so adding one leaves the tokenizer, the token ids and phase 1 exactly as they were.
LATE_KINDS = ("tool_hops",)
N_LATE_TRAIN = {"tool_hops": 16000}
N_LATE_TEST = {"tool_hops": 100}


def late_corpus(seed: int = 0, splits: tuple[str, ...] = ("train", "test")) -> tuple[list[dict], ...]:
    """Rows ({"kind", "text"}) of the late kinds for each split, seeded."""
    tokenizer = rendering_tokenizer()
    out = []
    for split in splits:
        counts = N_LATE_TRAIN if split == "train" else N_LATE_TEST
        rng = random.Random(f"{seed}-late-{split}")
        synth = Synth(rng, split, heldout_sums(seed))
        rows = []
        for kind in LATE_KINDS:
            for _ in range(counts[kind]):
                conv = getattr(synth, kind)()
                date = DATE_LO + datetime.timedelta(days=rng.randrange(2400))
                rows.append({"kind": kind, "text": render_text(tokenizer, conv, date)})
        out.append(rows)
    return tuple(out)


def late_fingerprint(seed: int = 0) -> str:
    """What the late kinds' generator makes now (its test split and the split sizes, hashed): a build folder whose
    token ids were made by another version (other phrasings, say) is regenerated, not trained on."""
    (test,) = late_corpus(seed, ("test",))
    payload = json.dumps([N_LATE_TRAIN, N_LATE_TEST, [r["text"] for r in test]])
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def unseen_tool_questions(seed: int = 0, n: int = 300) -> list[dict]:
    """Tool questions in the phrasings no training conversation uses (TOOL_TEMPLATES_UNSEEN), for evaluate.py."""
    synth = Synth(random.Random(f"{seed}-unseen-tools"), "test", heldout_sums(seed))
    out = []
    for _ in range(n):
        c = synth.tool(unseen_phrasing=True)
        out.append({"kind": "tool", "effort": c["effort"], "tools": c["tools"], "tool": c["tool"],
                    "arguments": c["arguments"], "answer": c["answer"], "messages": c["messages"],
                    "prompt": c["messages"][:1]})
    return out


def render_text(tokenizer, conv: dict, date: datetime.date) -> str:
    """The whole conversation as training text, through the harmony chat template; the system prompt's
    'Current date' is set to `date` (seeded) instead of today, so the corpus is reproducible."""
    kwargs = {"reasoning_effort": conv["effort"]}
    if conv["tools"]:
        kwargs["tools"] = conv["tools"]
    text = tokenizer.apply_chat_template(conv["messages"], tokenize=False, **kwargs)
    return re.sub(r"Current date: \d{4}-\d{2}-\d{2}", f"Current date: {date.isoformat()}", text, count=1)


def rendering_tokenizer():
    """A tokenizer carrying the harmony chat template of workbench.fixtures.tokenizer (read now, not copied)."""
    from workbench.fixtures import tokenizer as tok_module

    tokenizer = tok_module.build_tokenizer(harmony=True)
    tokenizer.chat_template = tok_module.HARMONY_CHAT_TEMPLATE
    return tokenizer


def synthetic(split: str, counts: dict[str, int], seed: int, tokenizer) -> list[dict]:
    held = heldout_sums(seed)
    rng = random.Random(f"{seed}-{split}")
    synth = Synth(rng, split, held)
    out = []
    for kind in SYNTHETIC_KINDS:
        for _ in range(counts[kind]):
            conv = getattr(synth, kind)()
            date = DATE_LO + datetime.timedelta(days=rng.randrange(2400))
            conv["text"] = render_text(tokenizer, conv, date)
            out.append(conv)
    rng.shuffle(out)
    return out


# ---- main -------------------------------------------------------------------------------------

def build(out: pathlib.Path, seed: int = 0) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    tokenizer = rendering_tokenizer()
    docs = {"prose": prose_files(), "code": code_files()}
    train, test = [], []
    counts = {}
    for kind, files in docs.items():
        order = list(range(len(files)))
        rng.shuffle(order)
        n_test = max(1, len(files) // 20)
        test_ids = set(order[:n_test])
        for i, (name, text) in enumerate(files):
            (test if i in test_ids else train).append({"kind": kind, "name": name, "text": text})
        counts[kind] = {"files": len(files), "test_files": n_test,
                        "chars": sum(len(t) for _, t in files)}
    syn_train = synthetic("train", N_TRAIN, seed, tokenizer)
    syn_test = synthetic("test", N_TEST, seed, tokenizer)
    for c in syn_train:
        train.append({"kind": c["kind"], "text": c["text"]})
    for c in syn_test:
        test.append({"kind": c["kind"], "text": c["text"]})
    for kind in SYNTHETIC_KINDS:
        counts[kind] = {"train_conversations": N_TRAIN[kind], "test_conversations": N_TEST[kind],
                        "chars": sum(len(c["text"]) for c in syn_train if c["kind"] == kind)}
    for name, rows in (("train.jsonl", train), ("test.jsonl", test)):
        with open(out / name, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    # Held-out questions: what evaluate.py asks, in the form the model is prompted with.
    questions = [{k: v for k, v in c.items() if k != "text"} for c in syn_test]
    for q in questions:
        q["prompt"] = [m for m in q["messages"] if m["role"] == "user"][:1]
    (out / "heldout.json").write_text(json.dumps({"seed": seed, "questions": questions,
                                                  "heldout_sums": sorted(heldout_sums(seed))}, indent=1))
    manifest = {"seed": seed, "counts": counts, "python_doc_dir": str(python_doc_dir()),
                "stdlib": sysconfig.get_paths()["stdlib"], "python": sys.version.split()[0],
                "train_docs": len(train), "test_docs": len(test)}
    (out / "data_manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    manifest = build(args.out, args.seed)
    print(json.dumps(manifest["counts"], indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
