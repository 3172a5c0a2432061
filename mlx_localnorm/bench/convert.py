"""``mlx-localnorm bench convert``: exactness per architecture, and memory while converting.

1. Exactness: on each tiny checkpoint of ``--fixtures`` (``tests/fixtures/hf/``, with the
   float32 logits ``transformers`` computed, stored by make_fixtures.py), the max abs logit
   difference of ``ln.convert.from_hf`` and of ``mlx_lm.utils.load_model`` to them.
2. Streaming: a random Llama checkpoint (``--size``; bfloat16, in shards of ``--shard-mb``)
   is written to a temporary directory, converted by each loader in a fresh process (wall
   time, MLX peak memory, peak RSS), then deleted. ``from_hf`` reads one shard at a time,
   so its MLX peak stays near the model plus the largest shard.
Timings on a loaded machine are not speed claims; the lead re-runs this file.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from .._argparse import OneLineParser
from .common import device, machine, markdown_table, write_csv

COLUMNS = ["machine", "device", "mlx", "section", "case", "loader", "max_abs_logit_diff",
           "seconds", "mlx_peak_mb", "max_rss_mb", "model_mb", "largest_shard_mb", "note"]
# Llama shapes by size: (hidden, layers, intermediate, vocab); about 0.3M, 60M and 480M
# parameters (tiny: for tests).
SIZES = {"tiny": (64, 2, 128, 1000), "small": (512, 8, 1408, 32000),
         "500m": (1280, 20, 3456, 32000)}
LOADERS = ("from_hf", "mlx_lm.load_model")
NOTES = {"from_hf": "bfloat16 checkpoint and model; with the tokenizer (a word per id)",
         "mlx_lm.load_model": "bfloat16 checkpoint and model; weights only"}
# Run in a fresh process so each peak is its own; prints one JSON line.
_MEASURE = """
import json, resource, sys, time
import mlx_localnorm as ln
import mlx.core as mx
from pathlib import Path
path, loader = Path(sys.argv[1]), sys.argv[2]
from transformers import AutoConfig
AutoConfig.for_model("llama")  # its first import (seconds, torch included) is not conversion
mx.reset_peak_memory()
start = time.perf_counter()
if loader == "from_hf":
    model, _ = ln.convert.from_hf(path, dtype="bfloat16")
else:
    from mlx_lm.utils import load_model
    model, _ = load_model(path)
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "mlx_peak_mb": mx.get_peak_memory() / 2**20,
                  "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def exactness_rows(fixtures: Path) -> list[dict]:
    """Max abs logit difference to the stored ``transformers`` logits, per fixture."""
    from mlx_lm.utils import load_model

    from ..convert import from_hf

    rows = []
    cases = sorted(p for p in fixtures.iterdir() if (p / "reference.npz").is_file())
    with tempfile.TemporaryDirectory(prefix="bench-convert-") as tmp:
        for case in cases:
            reference = np.load(case / "reference.npz")
            tokens = mx.array(reference["tokens"])
            ours, _ = from_hf(case)
            rows.append(_exact_row(case.name, "from_hf", ours, tokens, reference["logits"]))
            # mlx-lm reads transformers 4.x keys (rope_theta, rope_scaling), as most
            # published configs have them; the fixtures have 5.x's rope_parameters.
            legacy = _legacy_copy(case, Path(tmp) / case.name)
            try:
                theirs, _ = load_model(legacy)
            except Exception as error:  # noqa: BLE001 - mlx-lm's own failure is the result
                rows.append({"section": "exactness", "case": case.name,
                             "loader": "mlx_lm.load_model",
                             "note": f"fails: {type(error).__name__}: {error}"[:160]})
                continue
            rows.append(_exact_row(case.name, "mlx_lm.load_model", theirs, tokens,
                                   reference["logits"], "; 4.x rope keys"))
    return rows


def _legacy_copy(case: Path, target: Path) -> Path:
    """``case`` with its config's ``rope_parameters`` as 4.x ``rope_theta``/``rope_scaling``."""
    shutil.copytree(case, target)
    config = json.loads((target / "config.json").read_text())
    rope = config.pop("rope_parameters", None)
    if rope is not None:
        config["rope_theta"] = rope.pop("rope_theta")
        if rope.get("rope_type", "default") != "default":
            config["rope_scaling"] = rope
    (target / "config.json").write_text(json.dumps(config))
    return target


def _exact_row(case: str, loader: str, model, tokens, reference, note: str = "") -> dict:
    logits = np.array(model(tokens).astype(mx.float32), dtype=np.float64)
    return {"section": "exactness", "case": case, "loader": loader,
            "max_abs_logit_diff": f"{np.abs(logits - reference).max():.3g}",
            "note": f"vs transformers float32 (stored reference){note}"}


def write_random_checkpoint(directory: Path, size: str, shard_mb: float,
                            seed: int = 0) -> tuple[float, float]:
    """A random bfloat16 Llama checkpoint in shards; returns (model MB, largest shard MB)."""
    hidden, layers, inter, vocab = SIZES[size]
    heads = hidden // 64
    config = {"model_type": "llama", "vocab_size": vocab, "hidden_size": hidden,
              "intermediate_size": inter, "num_hidden_layers": layers,
              "num_attention_heads": heads, "num_key_value_heads": heads,
              "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "eos_token_id": 1,
              "max_position_embeddings": 2048}
    (directory / "config.json").write_text(json.dumps(config))
    _word_tokenizer(vocab).save_pretrained(str(directory))
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,),
              "lm_head.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}"
        shapes |= {f"{p}.input_layernorm.weight": (hidden,),
                   f"{p}.post_attention_layernorm.weight": (hidden,)}
        shapes |= {f"{p}.self_attn.{n}_proj.weight": (hidden, hidden) for n in "qkvo"}
        shapes |= {f"{p}.mlp.gate_proj.weight": (inter, hidden),
                   f"{p}.mlp.up_proj.weight": (inter, hidden),
                   f"{p}.mlp.down_proj.weight": (hidden, inter)}
    rng = np.random.default_rng(seed)
    shards, current, weight_map = [], {}, {}

    def flush():
        name = f"model-{len(shards) + 1:05d}.safetensors"
        mx.save_safetensors(str(directory / name), current, {"format": "pt"})
        shards.append(sum(v.nbytes for v in current.values()) / 2**20)
        weight_map.update(dict.fromkeys(current, name))
        current.clear()

    for name, shape in shapes.items():
        value = rng.standard_normal(shape, dtype=np.float32) * 0.02
        current[name] = mx.array(value).astype(mx.bfloat16)
        if sum(v.nbytes for v in current.values()) >= shard_mb * 2**20:
            flush()
    if current:
        flush()
    (directory / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": weight_map}))
    return sum(shards), max(shards)


def _word_tokenizer(vocab: int):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    words = {f"w{i}": i for i in range(vocab)}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(words, "w0")),
                                   unk_token="w0")


def streaming_rows(size: str, shard_mb: float) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="bench-convert-") as tmp:
        directory = Path(tmp)
        model_mb, largest = write_random_checkpoint(directory, size, shard_mb)
        rows = []
        for loader in LOADERS:
            result = subprocess.run([sys.executable, "-c", _MEASURE, str(directory), loader],
                                    capture_output=True, text=True, check=True)
            measured = json.loads(result.stdout.strip().splitlines()[-1])
            rows.append({"section": "streaming", "case": f"llama {size}", "loader": loader,
                         "seconds": f"{measured['seconds']:.3g}",
                         "mlx_peak_mb": f"{measured['mlx_peak_mb']:.4g}",
                         "max_rss_mb": f"{measured['max_rss_mb']:.4g}",
                         "model_mb": f"{model_mb:.4g}", "largest_shard_mb": f"{largest:.4g}",
                         "note": NOTES[loader]})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="mlx-localnorm bench convert", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench/results", help="output directory")
    parser.add_argument("--fixtures", default="tests/fixtures/hf",
                        help="tiny checkpoints with reference.npz (default: the repo's)")
    parser.add_argument("--size", choices=sorted(SIZES), default="small",
                        help="random checkpoint for the memory rows: tiny, small (about 60M "
                             "parameters, default) or 500m (about 480M)")
    parser.add_argument("--shard-mb", type=float, default=100.0,
                        help="shard size of the random checkpoint in MB (default: 100)")
    parser.add_argument("--sections", default="exactness,streaming",
                        help="comma separated: exactness, streaming (default: both)")
    args = parser.parse_args(argv)
    fixtures = Path(args.fixtures)
    if not fixtures.is_dir():
        parser.error(f"--fixtures: {str(fixtures)!r} is not a directory (run from the repo "
                     "root or pass the path)")
    if not args.shard_mb > 0:
        parser.error(f"--shard-mb must be positive, got {args.shard_mb}")
    sections = args.sections.split(",")
    if not sections or not set(sections) <= {"exactness", "streaming"}:
        parser.error(f"--sections must name exactness and/or streaming, got {args.sections!r}")
    start = time.perf_counter()
    rows = exactness_rows(fixtures) if "exactness" in sections else []
    if "streaming" in sections:
        rows += streaming_rows(args.size, args.shard_mb)
    context = {"machine": machine(), "device": device(), "mlx": mx.__version__}
    rows = [{c: {**context, **r}.get(c, "") for c in COLUMNS} for r in rows]
    path = write_csv(rows, Path(args.out) / "convert.csv")
    print(markdown_table(rows, COLUMNS[3:]))
    print(f"wrote {path} ({time.perf_counter() - start:.0f} s)")
    return 0
