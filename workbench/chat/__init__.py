"""Talking to a model: the harmony chat format (rendering, channel parsing) and streaming generation."""
from workbench.chat.harmony import (HARMONY_TOKENS, REASONING_EFFORTS, StreamParser, as_messages, is_harmony,
                                    make_parser, parse, render, stop_token_ids)

__all__ = ["HARMONY_TOKENS", "REASONING_EFFORTS", "StreamParser", "as_messages", "is_harmony", "make_parser", "parse",
           "render", "stop_token_ids"]
