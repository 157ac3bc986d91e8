"""SentencePiece tokenizer: load any .model (Llama-2's included), or train one with ChatML symbols.

floe ships `assets/floe_sp.model` (vocab 1024, byte fallback, <|im_start|> and <|im_end|> as
user-defined symbols, <pad> = 3), trained on the embedded synthetic sources by
`tools/train_tokenizer.py`; `data.tokenizer=null` selects it.

`Tokenizer.save_hf(dir)` writes the Hugging Face files (tokenizer.json, tokenizer_config.json,
special_tokens_map.json) with which `transformers.AutoTokenizer` gives exactly these ids.
"""
from __future__ import annotations

import hashlib
import io
import json
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

    @property
    def end_of_turn_id(self) -> int:
        """The id that ends an assistant turn (what generation stops at and the exported eos_token):
        <|im_end|> when it is one piece, else </s>."""
        return self.im_end[0] if len(self.im_end) == 1 else self.eos_id

    def save_hf(self, out_dir: str | Path, chat_template: str | None = None,
                model_max_length: int | None = None) -> list[str]:
        """Write tokenizer.json, tokenizer_config.json, special_tokens_map.json and tokenizer.model.

        transformers.AutoTokenizer then encodes any text to exactly `encode`'s ids: no BOS/EOS
        added, SentencePiece's own whitespace handling, the chat markers matched as whole
        tokens, and <s>, </s>, <unk> written in a text spelled out as SentencePiece does; one
        exception: the pad_token (<pad>; <unk> for a model without one) is matched whole
        (transformers registers its pad token as a special token). eos_token is the end-of-turn token (<|im_end|>), so a trainer that
        appends eos_token ends turns as floe does; the chat markers are special tokens
        (decode(skip_special_tokens=True) drops them). ValueError naming the file for a model it
        cannot mirror.
        """
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "tokenizer.json").write_text(hf_tokenizer_json(self.path))
        special = {"eos_token": self.piece(self.end_of_turn_id), "pad_token": self.piece(self.pad_id)}
        markers = [self.piece(ids[0]) for ids in (self.im_start, self.im_end) if len(ids) == 1]
        config = special | {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": False, "add_eos_token": False,
            "extra_special_tokens": [m for m in markers if m != special["eos_token"]],
            "clean_up_tokenization_spaces": False,
        }
        if model_max_length is not None:
            config["model_max_length"] = model_max_length
        if chat_template is not None:
            config["chat_template"] = chat_template
        (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
        (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2, ensure_ascii=False))
        (out_dir / "tokenizer.model").write_bytes(Path(self.path).read_bytes())
        return ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model"]


# SentencePiece piece types (sentencepiece_model.proto)
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


def hf_tokenizer_json(path: str | Path) -> str:
    """A `tokenizers` tokenizer.json that reproduces a SentencePiece BPE model's encode().

    SentencePiece BPE repeatedly merges the adjacent pair whose merged piece has the highest
    score; a BPE with one merge per (left, right) split of every normal piece, ranked by the
    merged piece's score, does the same. Whitespace becomes U+2581 in a normalizer (a
    pre-tokenizer would not prepend a second U+2581 to a text that starts with a space).
    """
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import AddedToken, decoders, models, normalizers
    from tokenizers import Tokenizer as HFTokenizer

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(path).read_bytes())
    trainer, norm = proto.trainer_spec, proto.normalizer_spec
    problems = [msg for bad, msg in (
        (trainer.model_type != sentencepiece_model_pb2.TrainerSpec.BPE, "model_type is not BPE"),
        (norm.name != "identity" or bool(norm.precompiled_charsmap), f"normalization rule {norm.name!r} is not identity"),
        (norm.remove_extra_whitespaces, "remove_extra_whitespaces is on"),
        (not norm.escape_whitespaces, "escape_whitespaces is off"),
        (trainer.treat_whitespace_as_suffix, "treat_whitespace_as_suffix is on")) if bad]
    if problems:
        raise ValueError(f"{path}: cannot be written as a Hugging Face tokenizer.json with the same ids: "
                         + "; ".join(problems))
    pieces = proto.pieces
    vocab = {p.piece: i for i, p in enumerate(pieces)}
    score = {p.piece: p.score for p in pieces if p.type == _NORMAL}
    merges = sorted((-score[piece], vocab[piece], vocab[piece[:k]], piece[:k], piece[k:])
                    for piece in score for k in range(1, len(piece))
                    if piece[:k] in score and piece[k:] in score)
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=[(a, b) for *_, a, b in merges], fuse_unk=True,
                                 unk_token=pieces[trainer.unk_id].piece, byte_fallback=trainer.byte_fallback))
    space = [normalizers.Replace(" ", "\u2581")]
    tok.normalizer = normalizers.Sequence(([normalizers.Prepend("\u2581")] if norm.add_dummy_prefix else []) + space)
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
                                    + ([decoders.Strip(" ", 1, 0)] if norm.add_dummy_prefix else []))
    # User-defined pieces are matched whole in any text, as SentencePiece does; the chat markers among
    # them are special (skipped by decode(skip_special_tokens=True)). Control pieces (<s>, </s>, <pad>)
    # and <unk> are not added tokens: a text that spells them is spelled out, as in SentencePiece.
    tok.add_tokens([AddedToken(p.piece, special=p.piece in CHAT_SYMBOLS, normalized=False)
                    for p in pieces if p.type == _USER_DEFINED])
    return tok.to_str(pretty=True)


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
