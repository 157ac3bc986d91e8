"""SentencePiece tokenizer: load any .model (Llama-2's included), or train one with ChatML symbols.

floe ships `assets/floe_sp.model` (vocab 1024, byte fallback, <|im_start|> and <|im_end|> as
user-defined symbols, <pad> = 3), trained on the embedded synthetic sources by
`tools/train_tokenizer.py`; `data.tokenizer=null` selects it.
"""
from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm

log = logging.getLogger(__name__)

DEFAULT_MODEL = Path(__file__).parent / "assets" / "floe_sp.model"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
CHAT_SYMBOLS = (IM_START, IM_END)


class Tokenizer:
    """A SentencePiece model plus the ids the chat template and the padding need."""

    def __init__(self, path: str | Path | None = None):
        self.path = str(DEFAULT_MODEL if path is None else path)
        if not Path(self.path).is_file():
            raise ValueError(f"data.tokenizer: no SentencePiece model at {self.path}")
        data = Path(self.path).read_bytes()
        self.fingerprint = hashlib.sha256(data).hexdigest()
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(data)
        except Exception as e:  # sentencepiece raises a bare RuntimeError/OSError on a bad file
            raise ValueError(f"data.tokenizer: {self.path} is not a SentencePiece model ({e})") from e
        self.vocab_size = self.sp.get_piece_size()
        self.eos_id = self.sp.eos_id()  # -1 if the model has none
        # Llama-2 has no pad piece; padding never reaches the loss or the router, so any id works.
        self.pad_id = next(i for i in (self.sp.pad_id(), self.sp.unk_id(), self.eos_id, 0) if i >= 0)
        self.im_start, self.im_end = self._symbol(IM_START), self._symbol(IM_END)

    def _symbol(self, piece: str) -> list[int]:
        """The ids of a chat marker: one id if the model has it as a piece, else its spelling."""
        i = self.sp.piece_to_id(piece)
        if i != self.sp.unk_id() and self.sp.id_to_piece(i) == piece:
            return [i]
        log.warning("tokenizer %s has no piece %s; it is spelled out in %d tokens", self.path, piece,
                    len(self.sp.encode(piece)))
        return self.sp.encode(piece)

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: list[str], num_threads: int = 1) -> list[list[int]]:
        """Encode many strings; SentencePiece spreads them over `num_threads` C++ threads."""
        return self.sp.encode(texts, num_threads=num_threads) if texts else []

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def piece(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))


def train_tokenizer(texts: Iterable[str], out_path: str | Path, vocab_size: int = 1024,
                    byte_fallback: bool = True, model_type: str = "bpe",
                    num_threads: int = 2) -> Tokenizer:
    """Train a SentencePiece model on `texts` and write it to `out_path`.

    Identity normalisation and no dummy prefix, so decode(encode(s)) == s for any text
    (newlines and code indentation included); digits are split so numbers are digit
    sequences; ChatML markers are user-defined symbols; ids: unk 0, bos 1, eos 2, pad 3.
    """
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size,
        model_type=model_type, byte_fallback=byte_fallback, character_coverage=1.0,
        user_defined_symbols=list(CHAT_SYMBOLS), unk_id=0, bos_id=1, eos_id=2, pad_id=3,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
        split_digits=True, allow_whitespace_only_pieces=True, split_by_whitespace=True,
        max_sentence_length=1 << 16, shuffle_input_sentence=False, num_threads=num_threads,
        minloglevel=2)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_bytes(model.getvalue())
    return Tokenizer(out_path)
