"""Train a SentencePiece tokenizer with the ChatML symbols, byte fallback and a pad id.

Rebuild the tokenizer floe ships (vocab 1024, trained on the embedded synthetic sources):
    python tools/train_tokenizer.py --out moe/data/assets/floe_sp.model
Train one on your own data (records in any layout and file kind training reads: JSONL, a JSON
array, Parquet, Arrow, a datasets directory; any other file is read as plain text lines):
    python tools/train_tokenizer.py --input my.jsonl chats.parquet notes.txt --vocab-size 32000 --out my_sp.model

Settings it could not train, or whose model tools/export.py could not write as a Hugging Face
tokenizer (only BPE is mirrored), are refused before training: one `floe:` line, exit 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from floe.data import formats, synthetic  # noqa: E402
from floe.data.template import render  # noqa: E402
from floe.data.tokenizer import CHAT_SYMBOLS, train_tokenizer  # noqa: E402
from floe.errors import ConfigError  # noqa: E402
from launch.errors import config_errors  # noqa: E402

RECORD_FILES = (".jsonl", ".json", ".parquet", ".arrow")
# byte fallback keeps a piece per byte; <unk>, <s>, </s>, <pad> and the chat symbols come on top
MIN_VOCAB_BYTE_FALLBACK = 256 + 4 + len(CHAT_SYMBOLS)

EMBEDDED_SEED = 1234  # not a training seed: the tokenizer sees a sample unlike any default epoch
EMBEDDED_PER_SOURCE = 6000


def embedded_corpus(per_source: int = EMBEDDED_PER_SOURCE, seed: int = EMBEDDED_SEED) -> list[str]:
    """ChatML renderings of the embedded sources, plus the identity questions once each."""
    # "all": the unfiltered stream the shipped model was trained on (held-out questions included:
    # a tokenizer sees text, not answers, and keeping the recipe keeps every token id)
    records = [r for s in synthetic.SOURCES for r in synthetic.generate(s, per_source, seed, split="all")]
    texts = [render(formats.parse_record(r)) for r in records]
    return texts + [q for q, _ in synthetic.identity_questions()]


def file_corpus(paths: list[str]) -> list[str]:
    """Texts of the given files: records rendered through the chat template, other files' lines."""
    texts = []
    for p in paths:
        if not Path(p).exists():
            raise ConfigError(f"--input: no file {p}")
        if Path(p).is_dir() or p.endswith(RECORD_FILES):
            read = formats.read_files([p], strict=False)
            texts += [render(ex) for ex in read.examples]
            for line in read.first_skips:
                print(f"{line} (not used for the tokenizer)", file=sys.stderr)
            if sum(read.skipped.values()) > len(read.first_skips):
                print(f"{p}: {formats.format_skipped(read.skipped)}", file=sys.stderr)
        else:
            texts += Path(p).read_text(encoding="utf-8").splitlines()
    return texts


def setting_errors(args) -> list[str]:
    """What train_tokenizer could not train, or tools/export.py could not write, found before training."""
    problems = []
    if args.model_type != "bpe":
        problems.append(f"--model-type {args.model_type}: floe exports only BPE SentencePiece models as a Hugging "
                        "Face tokenizer (tools/export.py; floe.data.tokenizer.hf_tokenizer_json); use --model-type bpe")
    low = MIN_VOCAB_BYTE_FALLBACK if not args.no_byte_fallback else 4 + len(CHAT_SYMBOLS) + 1
    if args.vocab_size < low:
        problems.append(f"--vocab-size {args.vocab_size}: at least {low} pieces are reserved "
                        f"({'256 bytes, ' if not args.no_byte_fallback else ''}<unk> <s> </s> <pad>, the chat symbols)")
    if args.threads < 1:
        problems.append(f"--threads must be >= 1, got {args.threads}")
    return problems


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", nargs="*", default=[], help="files to train on; none = the embedded sources")
    ap.add_argument("--out", required=True, help="where to write the .model file")
    ap.add_argument("--vocab-size", type=int, default=1024)
    ap.add_argument("--model-type", default="bpe", choices=["unigram", "bpe"])
    ap.add_argument("--no-byte-fallback", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    with config_errors():
        if problems := setting_errors(args):
            raise ConfigError("cannot train this tokenizer:\n  " + "\n  ".join(problems))
        texts = file_corpus(args.input) if args.input else embedded_corpus()
        try:
            tok = train_tokenizer(texts, args.out, vocab_size=args.vocab_size, model_type=args.model_type,
                                  byte_fallback=not args.no_byte_fallback, num_threads=args.threads)
        except RuntimeError as e:  # SentencePiece's own refusal, e.g. a vocabulary larger than the corpus allows
            raise ConfigError(f"SentencePiece refused the settings: {str(e).strip()}") from None
    print(json.dumps({"out": args.out, "vocab_size": tok.vocab_size, "pad_id": tok.pad_id,
                      "im_start": tok.im_start, "im_end": tok.im_end, "texts": len(texts)}))


if __name__ == "__main__":
    main()
