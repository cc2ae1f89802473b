"""gpt-oss workbench: load, chat, trace and look inside gpt-oss and other Hugging Face causal LMs."""
