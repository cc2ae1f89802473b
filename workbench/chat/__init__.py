"""Talking to a model: the harmony chat format (rendering, channel parsing), openai-harmony as its reference,
and streaming generation."""
from workbench.chat.harmony import (HARMONY_TOKENS, REASONING_EFFORTS, ROLES, StreamParser, as_messages, is_harmony,
                                    make_parser, parse, render, stop_token_ids)
from workbench.chat.reference import render_harmony
from workbench.chat.template_check import check_template

__all__ = ["HARMONY_TOKENS", "REASONING_EFFORTS", "ROLES", "StreamParser", "as_messages", "check_template",
           "is_harmony", "make_parser", "parse", "render", "render_harmony", "stop_token_ids"]
