"""The fixture tokenizers: a small real byte-level BPE with harmony or ChatML special tokens.

Trained in well under a second on the English text below, so fixtures need no download.
The gpt-oss tokenizer carries the harmony special tokens (in the real checkpoint's order, appended
after the ordinary vocabulary as there) and a chat template in the real gpt-oss format.
"""
from __future__ import annotations

import functools

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

# A few KB of plain English to learn merges from. Any text would do; this reads like chat.
CORPUS = """\
The quick brown fox jumps over the lazy dog. What is the capital of France? The capital of France is Paris.
Paris is a large city on the river Seine, and many people visit it every year to see its museums and parks.
A language model reads a sequence of tokens and predicts the next token. It was trained on a great deal of
text, and it learned which words tend to follow which. When you ask it a question, it answers one token at
a time, and each new token is added to the context before the next one is chosen.
Hello! How can I help you today? I would like to know how the weather will be tomorrow. It will be sunny in
the morning, with some clouds in the afternoon and a little rain in the evening. Thank you very much.
You are a helpful assistant. Please answer the question in one short sentence. Think step by step.
The user asked for a summary of the report. The report says that sales grew by ten percent this year, that
the new office opened in the spring, and that the team will hire five more engineers before the winter.
In a mixture of experts, a router looks at each token and sends it to a few experts out of many. Each expert
is a small feed forward network. The outputs of the chosen experts are weighted and added together, so the
model has many parameters but uses only some of them for every token.
Attention lets every token look back at the tokens before it. Some heads attend to the previous token, some
to the first token, and some to words that mean the same thing. A sliding window limits how far back a head
may look, which saves memory on long inputs. An attention sink is a place where a head can put its weight
when nothing else in the context is useful.
Once upon a time there was a small village near a forest. The children of the village liked to play by the
river, where the water was clear and cold. One day a girl found a old map under a stone, and she and her
brother decided to follow it. They walked for hours, crossed a bridge, climbed a hill, and at last they found
a wooden box full of letters written long ago by their grandmother.
Numbers: one, two, three, four, five, six, seven, eight, nine, ten. 1 2 3 4 5 6 7 8 9 10 100 2024 3.14
Code: def add(a, b): return a + b. print("hello, world"). for i in range(10): total += i. x = [1, 2, 3]
The reasoning effort can be low, medium or high. With high effort the model thinks for longer before it
gives its final answer. The analysis channel holds the thinking, and the final channel holds the answer.
Questions and answers: Why is the sky blue? Because air scatters blue light more than red light. What is
two plus two? Two plus two is four. Who wrote the play? It was written by a famous writer many years ago.
Where do you live? I live in a small house with a garden. When does the train leave? It leaves at nine.
"""

# In the order of the real gpt-oss vocabulary (ids 199998, 199999, 200002, 200003, 200005..200008, 200012).
HARMONY_SPECIAL_TOKENS = (
    "<|startoftext|>", "<|endoftext|>", "<|return|>", "<|constrain|>", "<|channel|>",
    "<|start|>", "<|end|>", "<|message|>", "<|call|>",
)
CHATML_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

# The real openai/gpt-oss-20b template, minus the TypeScript rendering of tool schemas and the
# builtin browser/python tools. Messages, channels, defaults and whitespace are the real ones.
HARMONY_CHAT_TEMPLATE = """\
{#- Harmony chat template (gpt-oss). Kwargs: reasoning_effort (low|medium|high, default medium), model_identity. #}
{%- macro build_system_message() -%}
    {%- if model_identity is not defined %}
        {%- set model_identity = "You are ChatGPT, a large language model trained by OpenAI." %}
    {%- endif %}
    {{- model_identity + "\\n" }}
    {{- "Knowledge cutoff: 2024-06\\n" }}
    {{- "Current date: " + strftime_now("%Y-%m-%d") + "\\n\\n" }}
    {%- if reasoning_effort is not defined %}
        {%- set reasoning_effort = "medium" %}
    {%- endif %}
    {{- "Reasoning: " + reasoning_effort + "\\n\\n" }}
    {{- "# Valid channels: analysis, commentary, final. Channel must be included for every message." }}
    {%- if tools -%}
        {{- "\\nCalls to these tools must go to the commentary channel: 'functions'." }}
    {%- endif -%}
{%- endmacro -%}

{{- "<|start|>system<|message|>" }}
{{- build_system_message() }}
{{- "<|end|>" }}

{%- if messages[0].role == "developer" or messages[0].role == "system" %}
    {%- set developer_message = messages[0].content %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set developer_message = "" %}
    {%- set loop_messages = messages %}
{%- endif %}

{%- if developer_message or tools %}
    {{- "<|start|>developer<|message|>" }}
    {%- if developer_message %}
        {{- "# Instructions\\n\\n" }}
        {{- developer_message }}
        {{- "\\n\\n" }}
    {%- endif %}
    {%- if tools -%}
        {{- "# Tools\\n\\n## functions\\n\\nnamespace functions {\\n\\n" }}
        {%- for tool in tools %}
            {%- set tool = tool.function if tool.function is defined else tool %}
            {{- "// " + (tool.description or "") + "\\ntype " + tool.name + " = (_: any) => any;\\n\\n" }}
        {%- endfor %}
        {{- "} // namespace functions" }}
    {%- endif -%}
    {{- "<|end|>" }}
{%- endif %}

{%- set last_tool_call = namespace(name=none) %}
{%- for message in loop_messages -%}
    {%- if message.role == 'assistant' -%}
        {%- if "tool_calls" in message %}
            {%- set tool_call = message.tool_calls[0] %}
            {%- if tool_call.function %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {%- if message.thinking %}
                {{- "<|start|>assistant<|channel|>analysis<|message|>" + message.thinking + "<|end|>" }}
            {%- endif %}
            {{- "<|start|>assistant to=functions." + tool_call.name + "<|channel|>commentary json<|message|>" }}
            {{- tool_call.arguments|tojson }}
            {{- "<|call|>" }}
            {%- set last_tool_call.name = tool_call.name %}
        {%- elif loop.last and not add_generation_prompt %}
            {#- Only a final assistant turn shows its thinking (training-style rendering). #}
            {%- if "thinking" in message %}
                {{- "<|start|>assistant<|channel|>analysis<|message|>" + message.thinking + "<|end|>" }}
            {%- endif %}
            {{- "<|start|>assistant<|channel|>final<|message|>" + message.content + "<|return|>" }}
        {%- else %}
            {#- Thinking of earlier turns is dropped, as in the real template. #}
            {{- "<|start|>assistant<|channel|>final<|message|>" + message.content + "<|end|>" }}
            {%- set last_tool_call.name = none %}
        {%- endif %}
    {%- elif message.role == 'tool' -%}
        {{- "<|start|>functions." + (last_tool_call.name or "unknown") }}
        {{- " to=assistant<|channel|>commentary<|message|>" + message.content|tojson + "<|end|>" }}
    {%- elif message.role == 'user' -%}
        {{- "<|start|>user<|message|>" + message.content + "<|end|>" }}
    {%- endif -%}
{%- endfor -%}

{%- if add_generation_prompt -%}
<|start|>assistant
{%- endif -%}
"""

CHATML_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

BPE_VOCAB_SIZE = 768  # 256 byte symbols + merges; the corpus supports roughly this many


@functools.lru_cache(maxsize=1)
def _trained_bpe_json() -> str:
    """Train the shared byte-level BPE once per process (deterministic for a fixed corpus)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE, min_frequency=2, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    return tokenizer.to_str()


def build_tokenizer(harmony: bool) -> PreTrainedTokenizerFast:
    """The fixture tokenizer: harmony specials + template (gpt-oss) or ChatML (the other families)."""
    backend = Tokenizer.from_str(_trained_bpe_json())
    if harmony:
        specials = HARMONY_SPECIAL_TOKENS
        roles = dict(bos_token="<|startoftext|>", eos_token="<|return|>", pad_token="<|endoftext|>")
        template = HARMONY_CHAT_TEMPLATE
    else:
        specials = CHATML_SPECIAL_TOKENS
        roles = dict(eos_token="<|im_end|>", pad_token="<|endoftext|>")
        template = CHATML_CHAT_TEMPLATE
    # Appended after the ordinary vocabulary in a fixed order, like the real checkpoints' specials.
    backend.add_special_tokens(list(specials))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **roles)
    tokenizer.chat_template = template
    return tokenizer

