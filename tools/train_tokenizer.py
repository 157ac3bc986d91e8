"""Train a SentencePiece tokenizer with the ChatML symbols, byte fallback and a pad id.

Rebuild the tokenizer floe ships (vocab 1024, trained on the embedded synthetic sources):
    python tools/train_tokenizer.py --out moe/data/assets/floe_sp.model
Train one on your own data (JSONL records in any supported form, or plain text files):
    python tools/train_tokenizer.py --input my.jsonl notes.txt --vocab-size 32000 --out my_sp.model
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from floe.data import formats, synthetic  # noqa: E402
from floe.data.template import render  # noqa: E402
from floe.data.tokenizer import train_tokenizer  # noqa: E402

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
    """Texts of the given files: .jsonl records rendered through the chat template, else raw lines."""
    texts = []
    for p in paths:
        if p.endswith(".jsonl"):
            for lineno, value in formats.iter_jsonl(p):
                try:
                    if isinstance(value, formats.BadRecord):
                        raise value
                    if value is not None:
                        texts.append(render(formats.parse_record(value)))
                except formats.BadRecord as e:
                    print(f"{p}:{lineno}: {e} (line not used for the tokenizer)", file=sys.stderr)
        else:
            texts += Path(p).read_text(encoding="utf-8").splitlines()
    return texts


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", nargs="*", default=[], help="files to train on; none = the embedded sources")
    ap.add_argument("--out", required=True, help="where to write the .model file")
    ap.add_argument("--vocab-size", type=int, default=1024)
    ap.add_argument("--model-type", default="bpe", choices=["unigram", "bpe"])
    ap.add_argument("--no-byte-fallback", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    texts = file_corpus(args.input) if args.input else embedded_corpus()
    tok = train_tokenizer(texts, args.out, vocab_size=args.vocab_size, model_type=args.model_type,
                          byte_fallback=not args.no_byte_fallback, num_threads=args.threads)
    print(json.dumps({"out": args.out, "vocab_size": tok.vocab_size, "pad_id": tok.pad_id,
                      "im_start": tok.im_start, "im_end": tok.im_end, "texts": len(texts)}))


if __name__ == "__main__":
    main()
