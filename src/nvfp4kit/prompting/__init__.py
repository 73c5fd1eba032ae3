"""Chat prompts: the checkpoint's chat template rendered in a sandbox, and its tokens with client text kept as text.

Below `llm.py` and `serve/`, which both render chats.
"""
