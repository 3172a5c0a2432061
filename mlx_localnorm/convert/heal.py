"""Healing a norm swap: a short fine-tune of the norm parameters only (or LoRA, or all).

It runs ``mlx-localnorm finetune``'s trainer (``Finetuner``: progress bar, metrics, loss
plot) on the model saved to a scratch directory, so the swapped model is trained exactly
as a fine-tuning run would train it.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from ..data import load_corpus
from ..models import Model, save_model
from ..train.adapters import fuse_adapters
from ..train.finetune import Finetuner, FinetuneConfig

# The default healing text: the first documents of the embedded Shakespeare, in chunks.
CHUNK_CHARS = 800  # about 200 tokens: under the default max_seq_len of 256
CHUNKS = 512
HEAL_MODES = ("norms", "lora", "full")


def shakespeare_jsonl(directory: Path) -> Path:
    """train.jsonl / valid.jsonl of ``{"text": ...}`` chunks of the embedded Shakespeare."""
    corpus = load_corpus(None)
    directory.mkdir(parents=True, exist_ok=True)
    for split, docs in (("train", corpus.train), ("valid", corpus.valid)):
        text = "\n".join(docs)
        chunks = [text[i:i + CHUNK_CHARS] for i in range(0, CHUNKS * CHUNK_CHARS, CHUNK_CHARS)]
        with (directory / f"{split}.jsonl").open("w") as f:
            f.writelines(json.dumps({"text": c}) + "\n" for c in chunks if c.strip())
    return directory


def heal(model: Model, tokenizer, steps: int, data: str | Path | None = None, *,
         mode: str = "norms", norm_params: str = "all", run_dir: str | Path | None = None,
         learning_rate=None, batch_size: int = 4, max_seq_len: int = 256,
         progress: bool = True) -> Model:
    """Fine-tune ``model`` for ``steps`` steps and return the trained model.

    ``mode``: ``"norms"`` trains only the norm parameters (gains, biases, SeeDNorm's
    ``alpha``/``beta``, DyT's ``alpha``; the default), ``"lora"`` or ``"full"`` as
    ``mlx-localnorm finetune --mode``; ``norm_params`` (norms mode): ``"all"``, ``"gains"``
    (weight and bias) or ``"weight"`` (the gain alone). ``data``: mlx-lm's JSONL (a file, or
    a directory with train.jsonl and valid.jsonl); None = chunks of the embedded Shakespeare.
    ``run_dir`` keeps the run (metrics.jsonl, loss plot, adapter); None = a scratch directory.
    A quantized model heals in ``norms`` mode: its norms are float.
    """
    if mode not in HEAL_MODES:
        raise ValueError(f"heal: mode must be one of {HEAL_MODES}, got {mode!r}")
    with tempfile.TemporaryDirectory(prefix="localnorm-heal-") as scratch:
        scratch = Path(scratch)
        save_model(model, tokenizer, scratch / "model")
        config = FinetuneConfig(
            model=str(scratch / "model"), mode=mode, norm_params=norm_params, steps=steps,
            data=str(data if data is not None else shakespeare_jsonl(scratch / "data")),
            out_dir=str(run_dir if run_dir is not None else scratch / "run"),
            learning_rate=learning_rate, batch_size=batch_size, max_seq_len=max_seq_len,
            warmup_steps=min(10, steps // 10), eval_every=0, save_every=0, progress=progress)
        tuner = Finetuner(config)
        tuner.run()
    tuner.model.eval()
    return fuse_adapters(tuner.model)  # LoRA baked into the weights, as mlx-localnorm fuse
