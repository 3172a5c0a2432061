"""The Chit Chat Challenge corpus (PyPI ``chitchat-dataset``, MIT, BYU PCC lab) as fine-tuning
records: 7,168 two-person conversations, about 260k messages.

Optional: ``pip install chitchat-dataset`` (or ``pip install 'mlx-localnorm[chitchat]'``).

A conversation alternates two speakers; a message is the speaker's consecutive utterances
joined by a space. The first speaker is the ``user``, the second the ``assistant``; each
assistant message makes one record: it and up to ``turns - 1`` messages before it (default
4 messages, starting on a user turn). With mlx-lm's masking (all but the last message) every
assistant message is trained on exactly once, the earlier ones being context. Records are
``chat`` (for a tokenizer with a chat template) or ``completions`` (``User: ...\\nAssistant:
...\\nAssistant:`` -> the reply, for ours). Conversations are split by a hash of their id:
the split does not depend on ``limit``.
"""

from __future__ import annotations

import functools
import hashlib
from typing import Any

from .sft import SFTData, tokenize_records

ROLES = ("user", "assistant")
LABELS = {"user": "User", "assistant": "Assistant"}


def chitchat_records(
    fmt: str = "chat", turns: int = 4, limit: int | None = None, valid_percent: int = 5
) -> dict[str, list[dict]]:
    """``{"train": [...], "valid": [...]}`` records from the first ``limit`` conversations
    (all if None); ``valid_percent`` of the conversations (by id hash) go to ``valid``."""
    if fmt not in ("chat", "completions"):
        raise ValueError(f"chitchat_records(fmt=...) must be 'chat' or 'completions', got {fmt!r}")
    if not isinstance(turns, int) or turns < 2 or turns % 2:
        raise ValueError(f"chitchat_records(turns=...) must be an even int >= 2, got {turns!r}")
    if not isinstance(valid_percent, int) or not 0 <= valid_percent <= 100:
        raise ValueError(
            f"chitchat_records(valid_percent=...) must be an int in [0, 100], got {valid_percent!r}"
        )
    splits: dict[str, list[dict]] = {"train": [], "valid": []}
    for number, (cid, conversation) in enumerate(_conversations().items()):
        if limit is not None and number >= limit:
            break
        split = "valid" if _percentile(cid) < valid_percent else "train"
        messages = [" ".join(u["text"] for u in m) for m in conversation["messages"]]
        for reply in range(1, len(messages), 2):
            window = messages[max(0, reply + 1 - turns): reply + 1]  # starts on a user turn
            chat = [{"role": ROLES[i % 2], "content": t} for i, t in enumerate(window)]
            splits[split].append(_record(chat, fmt))
    return splits


def load_chitchat(tokenizer: Any, fmt: str | None = None, mask_prompt: bool = True,
                  **kwargs: Any) -> SFTData:
    """Tokenized :func:`chitchat_records`; ``fmt`` None picks ``chat`` if the tokenizer has a
    chat template, else ``completions``. ``kwargs`` go to :func:`chitchat_records`."""
    from .sft import has_chat_template

    fmt = fmt or ("chat" if has_chat_template(tokenizer) else "completions")
    splits = chitchat_records(fmt, **kwargs)
    examples = {
        split: tokenize_records(records, fmt, tokenizer, mask_prompt, source=f"chitchat {split}")
        for split, records in splits.items()
    }
    return SFTData(examples["train"], examples["valid"] or None, None, fmt)


def _record(chat: list[dict], fmt: str) -> dict:
    if fmt == "chat":
        return {"messages": chat}
    context = "".join(f"{LABELS[m['role']]}: {m['content']}\n" for m in chat[:-1])
    return {"prompt": f"{context}{LABELS['assistant']}:", "completion": chat[-1]["content"]}


def _percentile(conversation_id: str) -> int:
    return int.from_bytes(hashlib.sha256(conversation_id.encode()).digest()[:8], "big") % 100


@functools.cache  # 40 MB of JSON: read once per process
def _conversations() -> dict:
    try:
        import chitchat_dataset
    except ImportError:
        raise ImportError(
            "the chitchat corpus needs the optional package chitchat-dataset: "
            "pip install chitchat-dataset"
        ) from None
    return chitchat_dataset.Dataset()
