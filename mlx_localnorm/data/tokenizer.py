"""A sentencepiece tokenizer trained on the corpus, saved so mlx-lm loads it with the same ids.

SentencePiece: Kudo & Richardson, arXiv 1808.06226; BPE: Sennrich et al., arXiv 1508.07909;
unigram language model: Kudo, arXiv 1804.10959.

``train_tokenizer`` writes one vocabulary in two forms into the run directory:

- ``tokenizer.model``: the sentencepiece model (the data pipeline encodes with it);
- ``tokenizer.json`` + ``tokenizer_config.json``: the same model rebuilt with the
  ``tokenizers`` library, which ``mlx_lm.load``/``transformers.AutoTokenizer`` read offline.
  (``transformers`` 5.x cannot convert a sentencepiece model by itself.)

Text is kept byte-exact: no Unicode normalization, no whitespace collapsing, and byte
fallback, so every string encodes and ``decode(encode(text)) == text``.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_pb2
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

from ._io import atomic_write_bytes

MODEL_TYPES = ("bpe", "unigram")
UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
SPM_FILE = "tokenizer.model"
HF_FILE = "tokenizer.json"
MAX_TRAINING_LINES = 10_000_000
# The smallest vocabulary: 4 special pieces, 256 byte pieces and one learned piece.
MIN_VOCAB_SIZE = 261
_NORMAL, _USER_DEFINED = (
    sp_pb2.ModelProto.SentencePiece.NORMAL,
    sp_pb2.ModelProto.SentencePiece.USER_DEFINED,
)


def train_tokenizer(
    texts: Iterable[str],
    out_dir: str | os.PathLike,
    vocab_size: int = 8192,
    model_type: str = "bpe",
) -> spm.SentencePieceProcessor:
    """Train a sentencepiece model on ``texts`` and save it (and its mlx-lm view) in ``out_dir``.

    Ids 0-3 are ``<unk> <s> </s> <pad>``, then 256 byte pieces ``<0x00>``..``<0xFF>`` for
    byte fallback, then the learned pieces. Newlines are not pieces: they encode as the
    byte ``<0x0A>``, as in Llama's tokenizer. Training reads the texts line by line (a
    seeded sample of ``MAX_TRAINING_LINES`` lines if there are more), and is deterministic.

    Args:
        texts: training documents (the corpus' ``train`` split).
        out_dir: the run directory; created if missing.
        vocab_size: total number of ids, at least 261 (special and byte pieces + 1).
        model_type: ``"bpe"`` (fast to train) or ``"unigram"``.

    Returns:
        The trained ``sentencepiece.SentencePieceProcessor``.
    """
    if isinstance(texts, str):
        raise TypeError("train_tokenizer(texts=...) expects an iterable of documents, got one str")
    if model_type not in MODEL_TYPES:
        raise ValueError(
            f"train_tokenizer(model_type=...) must be one of {MODEL_TYPES}, got {model_type!r}"
        )
    if not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"train_tokenizer(vocab_size=...) must be an int >= {MIN_VOCAB_SIZE} (4 special + "
            f"256 byte pieces + 1), got {vocab_size!r}"
        )
    model = io.BytesIO()
    # Past MAX_TRAINING_LINES, sentencepiece samples lines at random: seed it for reproducibility.
    spm.set_random_generator_seed(0)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_lines(texts),
            model_writer=model,
            model_type=model_type,
            vocab_size=vocab_size,
            byte_fallback=True,
            character_coverage=0.9995,
            # Byte-exact text: no NFKC, keep every space, so decode(encode(t)) == t.
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            split_digits=True,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=3,
            unk_piece=UNK,
            bos_piece=BOS,
            eos_piece=EOS,
            pad_piece=PAD,
            input_sentence_size=MAX_TRAINING_LINES,
            max_sentence_length=1 << 16,
            num_threads=os.cpu_count() or 1,
            minloglevel=2,
        )
    except RuntimeError as e:
        raise ValueError(
            f"train_tokenizer(vocab_size={vocab_size}, model_type={model_type!r}) "
            f"failed on this text: {e}"
        ) from None
    return save_tokenizer(model.getvalue(), out_dir)


def save_tokenizer(model_proto: bytes, out_dir: str | os.PathLike) -> spm.SentencePieceProcessor:
    """Write ``tokenizer.model``, ``tokenizer.json`` and ``tokenizer_config.json`` to ``out_dir``."""
    out_dir = Path(out_dir)
    atomic_write_bytes(out_dir / SPM_FILE, model_proto)
    _save_hf_tokenizer(model_proto, out_dir)
    return load_tokenizer(out_dir)


def load_tokenizer(path: str | os.PathLike) -> spm.SentencePieceProcessor:
    """The sentencepiece model in a run directory (or a ``.model`` file)."""
    path = Path(path)
    model_file = path / SPM_FILE if path.is_dir() else path
    if not model_file.is_file():
        raise FileNotFoundError(
            f"no sentencepiece model at {str(model_file)!r}; train one with "
            f"train_tokenizer(texts, out_dir)"
        )
    return spm.SentencePieceProcessor(model_file=str(model_file))


def tokenizer_hash(tokenizer: spm.SentencePieceProcessor) -> str:
    """SHA-256 of the serialized model: token files record it to catch a tokenizer mismatch."""
    return hashlib.sha256(tokenizer.serialized_model_proto()).hexdigest()


def _lines(texts: Iterable[str]) -> Iterator[str]:
    for text in texts:
        for line in text.split("\n"):
            if line.strip():
                yield line


def _hf_tokenizer(model_proto: bytes) -> Tokenizer:
    """The sentencepiece model as a ``tokenizers.Tokenizer`` giving the same ids.

    Like Llama's ``tokenizer.json``: prepend one ``▁`` (sentencepiece's dummy prefix) and map
    spaces to ``▁``; BPE merges are ranked by the id of the merged piece, which is the
    order in which sentencepiece's BPE applies them. Literal control strings in the text
    (``<s>``, ``<0x41>``) stay plain text, as in sentencepiece, except with ``unigram``:
    Hugging Face's Unigram cannot keep control pieces out of its lattice.
    """
    proto = sp_pb2.ModelProto()
    proto.ParseFromString(model_proto)
    pieces = [(p.piece, p.score, p.type) for p in proto.pieces]
    if proto.trainer_spec.model_type == sp_pb2.TrainerSpec.BPE:
        vocab = {piece: i for i, (piece, _, _) in enumerate(pieces)}
        mergeable = {piece for piece, _, kind in pieces if kind in (_NORMAL, _USER_DEFINED)}
        merges = sorted(
            (vocab[piece], vocab[piece[:k]], vocab[piece[k:]], piece[:k], piece[k:])
            for piece in mergeable
            for k in range(1, len(piece))
            if piece[:k] in mergeable and piece[k:] in mergeable
        )
        model = models.BPE(
            vocab=vocab,
            merges=[(a, b) for *_, a, b in merges],
            unk_token=UNK,
            byte_fallback=True,
            fuse_unk=True,
        )
    else:
        model = models.Unigram(
            [(piece, score) for piece, score, _ in pieces], unk_id=0, byte_fallback=True
        )
    tok = Tokenizer(model)
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    # mlx-lm recognises exactly this decoder and streams with its SPM detokenizer.
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A {BOS} $B",
        special_tokens=[(BOS, proto.trainer_spec.bos_id)],
    )
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in (UNK, BOS, EOS, PAD)]
    )
    return tok


def _save_hf_tokenizer(model_proto: bytes, out_dir: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(
        tokenizer_object=_hf_tokenizer(model_proto),
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        clean_up_tokenization_spaces=False,
        split_special_tokens=True,
    )
    # save_pretrained writes several files in place: stage them, then rename each one.
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".tokenizer.") as tmp:
        for path in hf.save_pretrained(tmp):
            os.replace(path, out_dir / Path(path).name)
