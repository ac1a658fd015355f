"""SentencePiece tokenizer, streaming detokenizer and the chat format of the -it models.

The chat format (Gemma's):

    <bos><start_of_turn>user
    {message}<end_of_turn>
    <start_of_turn>model
    {reply}<end_of_turn>
    <start_of_turn>user
    ...

Prompts are built from ids: the turn markers are inserted as ids and only the
text between them is encoded, so a message that contains the text
"<start_of_turn>" stays text and cannot open a turn of its own.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import sentencepiece as spm

from rgemma._io import atomic_file

TOKENIZER_FILE = "tokenizer.model"
START_OF_TURN = "<start_of_turn>"
END_OF_TURN = "<end_of_turn>"
# "model" is Gemma's name for the assistant.
ROLES = {"system": "system", "user": "user", "assistant": "model", "model": "model"}
REPLACEMENT_CHARACTER = "\ufffd"
# The longest UTF-8 character is 4 bytes: a replacement character with 3 more
# tokens after it can no longer become part of a real character.
UTF8_MAX_CONTINUATION = 3


class TokenizerError(ValueError):
    """A tokenizer that cannot be found, read or used as asked; the message names the file."""


class Tokenizer:
    def __init__(self, model_file: str | os.PathLike):
        self.path = Path(model_file)
        if not self.path.is_file():
            raise TokenizerError(f"{self.path}: no such file" if not self.path.exists() else f"{self.path}: not a file")
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.Load(str(self.path))
        except (OSError, RuntimeError) as error:
            first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise TokenizerError(f"{self.path}: not a readable SentencePiece model ({first_line})") from None
        self.vocab_size = self._sp.get_piece_size()
        self.bos_id = self._sp.bos_id()
        self.eos_id = self._sp.eos_id()
        self.pad_id = self._sp.pad_id()  # -1 when the model defines none
        if self.bos_id < 0 or self.eos_id < 0:
            raise TokenizerError(f"{self.path}: the model defines no bos or eos piece")
        self.start_of_turn_id = self._piece_id(START_OF_TURN)
        self.end_of_turn_id = self._piece_id(END_OF_TURN)
        # Text that spells a turn marker is encoded as two plain halves, never as the marker.
        # Gemma adds no dummy prefix, so the halves decode to exactly the marker's text.
        self._plain = {
            i: self._sp.encode(piece[:1]) + self._sp.encode(piece[1:])
            for piece, i in ((START_OF_TURN, self.start_of_turn_id), (END_OF_TURN, self.end_of_turn_id))
            if i is not None
        }

    @classmethod
    def find(cls, model_path: str | os.PathLike) -> Tokenizer:
        """The tokenizer.model in a model directory or beside it (an Orbax directory), or beside a checkpoint file."""
        model_path = Path(model_path)
        places = [model_path, model_path.parent] if model_path.is_dir() else [model_path.parent]
        for place in places:
            if (place / TOKENIZER_FILE).is_file():
                return cls(place / TOKENIZER_FILE)
        looked = " or ".join(str(place / TOKENIZER_FILE) for place in places)
        raise TokenizerError(f"no tokenizer for {model_path}: looked for {looked}")

    def check_fits(self, vocab_size: int) -> None:
        """Refuse a model whose vocabulary is smaller than this tokenizer's: its ids would not all have a row."""
        if self.vocab_size > vocab_size:
            raise TokenizerError(
                f"{self.path}: {self.vocab_size} pieces, more than the model's vocabulary of {vocab_size}: "
                "not the model's tokenizer"
            )

    def _piece_id(self, piece: str) -> int | None:
        # Unknown pieces map to the unk id, so check the way back.
        i = self._sp.piece_to_id(piece)
        return i if self._sp.id_to_piece(i) == piece else None

    def encode(self, text: str, bos: bool = False) -> list[int]:
        """The ids of plain text: turn markers spelt in it stay text."""
        if not isinstance(text, str):
            raise TokenizerError(f"can only encode text (str), got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as error:
            # A lone surrogate: what Python makes of invalid UTF-8 in argv, or of "\ud800" in JSON.
            raise TokenizerError(
                f"the text is not valid Unicode: lone surrogate {text[error.start]!r} at character {error.start}"
            ) from None
        ids = self._sp.encode(text)
        if not self._plain.keys().isdisjoint(ids):
            ids = [j for i in ids for j in self._plain.get(i, (i,))]
        return [self.bos_id] + ids if bos else ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode(list(ids))

    def token_bytes(self, token: int) -> bytes:
        """The UTF-8 bytes one token stands for on its own: a byte piece's byte, a word piece's
        text with its space marker as a space, a control piece's name."""
        piece = self._sp.id_to_piece(token)
        if self._sp.is_byte(token):  # "<0x0A>"
            return bytes([int(piece[3:-1], 16)])
        return piece.replace("\u2581", " ").encode()

    def detokenizer(self) -> StreamingDetokenizer:
        return StreamingDetokenizer(self)


class StreamingDetokenizer:
    """Turns tokens into text one at a time; everything returned adds up to `decode(all tokens)`.

    Only the tokens not yet shown are decoded, never the history, so a token
    costs O(1). What came before matters to SentencePiece in two ways only:
    byte-fallback tokens combine into UTF-8 characters, so tokens are held
    back while their text ends with a replacement character (at most 3 more
    bytes can complete it); and a model with a dummy prefix (Gemma has none)
    drops the leading space of the first piece while the text is still empty.
    For the second, the pending tokens are decoded after a context that puts
    SentencePiece in the same state: nothing at first, a token with visible
    text once text has appeared.
    """

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        # A token with visible text in any context (the unknown token shows as " ⁇ ").
        self._anchor = [tokenizer._sp.unk_id()]
        self._context: list[int] = []
        self._pending: list[int] = []
        self._parts: list[str] = []

    @property
    def text(self) -> str:
        return "".join(self._parts)

    def add(self, token: int) -> str:
        """The text this token completes: "" while a multi-byte character is incomplete."""
        self._pending.append(token)
        text = self._decode(self._pending, self._context)
        if not text.endswith(REPLACEMENT_CHARACTER):
            return self._emit(len(self._pending), text)
        # The text may end with the first bytes of a character, which has at most
        # 4 bytes: the tokens before the last 3 are final unless a character
        # straddles the cut. If one does, decoding the two sides apart turns it
        # into two or more replacement characters and the text changes.
        cut = len(self._pending) - UTF8_MAX_CONTINUATION
        if cut > 0:
            head = self._decode(self._pending[:cut], self._context)
            if text == head + self._decode(self._pending[cut:], self._anchor):
                return self._emit(cut, head)
        return ""

    def flush(self) -> str:
        """Whatever remains at the end, incomplete characters as replacement characters."""
        return self._emit(len(self._pending), self._decode(self._pending, self._context))

    def _decode(self, ids: list[int], context: list[int]) -> str:
        """The text of `ids` when they follow `context`."""
        return self._tokenizer.decode(context + ids)[len(self._tokenizer.decode(context)):]

    def _emit(self, count: int, new: str) -> str:
        emitted, self._pending = self._pending[:count], self._pending[count:]
        if self._context != self._anchor:
            if new:
                self._context = self._anchor
            else:
                # Nothing visible yet: keep the last non-control token (a lone space
                # piece whose space was dropped), which decides whether the next
                # leading space is dropped too.
                kept = [t for t in emitted if not self._tokenizer._sp.is_control(t)]
                self._context = kept[-1:] or self._context
        self._parts.append(new)
        return new


# Chat format ----------------------------------------------------------------


def _turn_markers(tokenizer: Tokenizer) -> tuple[int, int]:
    if tokenizer.start_of_turn_id is None or tokenizer.end_of_turn_id is None:
        raise TokenizerError(
            f"{tokenizer.path}: the tokenizer has no {START_OF_TURN} / {END_OF_TURN} pieces (not a chat model)"
        )
    return tokenizer.start_of_turn_id, tokenizer.end_of_turn_id


def _open_turn(tokenizer: Tokenizer, role: str, text: str = "") -> list[int]:
    """`<start_of_turn>{role}\\n{text}`: the text between markers is encoded as one string."""
    start, _ = _turn_markers(tokenizer)
    return [start] + tokenizer.encode(f"{role}\n{text}")


def _close_turn(tokenizer: Tokenizer) -> list[int]:
    _, end = _turn_markers(tokenizer)
    return [end] + tokenizer.encode("\n")


def _turns(messages: Sequence[Mapping]) -> list[tuple[str, str]]:
    """(role, text) of each turn, roles alternating user and model, the system message folded into the first."""
    turns: list[tuple[str, str]] = []
    system = None
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(f"message {i}: expected a dict with role and content, got {type(message).__name__}")
        role = ROLES.get(message.get("role"))
        if role is None:
            raise ValueError(f"message {i}: unknown role {message.get('role')!r}; valid: {', '.join(ROLES)}")
        content = message.get("content")
        if not isinstance(content, str):
            problem = "no content" if content is None else f"content must be a string, got {type(content).__name__}"
            raise ValueError(f"message {i}: {problem}")
        # Gemma's chat template trims every message.
        content = content.strip()
        if role == "system":
            if i:
                raise ValueError(f"message {i}: a system message must come first")
            system = content
            continue
        if turns and role == turns[-1][0]:
            raise ValueError(f"message {i}: two {message['role']} messages in a row; user and assistant must alternate")
        if not turns and role != "user":
            raise ValueError(f"message {i}: the conversation must start with a user message, got {message['role']}")
        if system and not turns:
            content = f"{system}\n\n{content}"
        turns.append((role, content))
    if system is not None and not turns:
        raise ValueError("message 0: a system message must be followed by a user message")
    return turns


def _turn(tokenizer: Tokenizer, role: str, text: str) -> list[int]:
    if role == "model":
        # A reply is encoded apart from its header, as it was generated: after the prompt
        # `<start_of_turn>model\n`. So generated ids and a re-rendered history agree.
        return _open_turn(tokenizer, role) + tokenizer.encode(text) + _close_turn(tokenizer)
    return _open_turn(tokenizer, role, text) + _close_turn(tokenizer)


def chat_turns(tokenizer: Tokenizer, messages: Sequence[Mapping], add_generation_prompt: bool = True) -> list[list[int]]:
    """The ids of a conversation in pieces: [bos], each turn (a system message folded into the first),
    then the prompt for the reply. A conversation's pieces start with those of each of its beginnings."""
    _turn_markers(tokenizer)
    pieces = [[tokenizer.bos_id]] + [_turn(tokenizer, role, text) for role, text in _turns(messages)]
    if add_generation_prompt:
        pieces.append(_open_turn(tokenizer, "model"))
    return pieces


def chat_prompt(tokenizer: Tokenizer, messages: Sequence[Mapping], add_generation_prompt: bool = True) -> list[int]:
    """The ids of a conversation; messages are {"role": system|user|assistant|model, "content": str}."""
    return [token for piece in chat_turns(tokenizer, messages, add_generation_prompt) for token in piece]


def next_user_turn(tokenizer: Tokenizer, content: str) -> list[int]:
    """The ids to feed after a reply that was read through its `<end_of_turn>`:
    the newline that ends the reply's turn, the user's message and the prompt
    for the next reply.

    `chat_prompt(messages) + encode(reply) + [<end_of_turn>] + next_user_turn(message)`
    equals the chat_prompt of the conversation with the reply and the message appended.
    """
    _turn_markers(tokenizer)
    return tokenizer.encode("\n") + _turn(tokenizer, "user", content.strip()) + _open_turn(tokenizer, "model")


# Training -------------------------------------------------------------------


def train_tokenizer(
    sentences: Iterable[str],
    out_file: str | os.PathLike,
    vocab_size: int,
    *,
    add_dummy_prefix: bool = False,
    turn_markers: bool = True,
    character_coverage: float = 0.9995,
    max_sentences: int = 2_000_000,
) -> Path:
    """Train a BPE SentencePiece model with Gemma's layout and write it to `out_file`.

    Gemma's layout: pad 0, eos 1, bos 2, unk 3, the turn markers as
    user-defined pieces, byte fallback (no unknown characters), digits split
    one by one, no normalisation and no dummy prefix. Deterministic: one
    thread, and the model is written from memory so no path ends up in it.
    """
    model = io.BytesIO()
    with open(os.devnull, "w") as quiet:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_writer=model,
            model_type="bpe",
            vocab_size=vocab_size,
            pad_id=0, eos_id=1, bos_id=2, unk_id=3,
            pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
            user_defined_symbols=[START_OF_TURN, END_OF_TURN] if turn_markers else [],
            byte_fallback=True,
            split_digits=True,
            character_coverage=character_coverage,
            normalization_rule_name="identity",
            add_dummy_prefix=add_dummy_prefix,
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            input_sentence_size=max_sentences,
            shuffle_input_sentence=True,
            num_threads=1,
            logstream=quiet,
        )
    out_file = Path(out_file)
    with atomic_file(out_file) as temporary:
        temporary.write_bytes(model.getvalue())
    return out_file
