"""A small SentencePiece model with Gemma's layout, trained in a second for tests.

Gemma's tokenizer is a BPE SentencePiece model with pad 0, eos 1, bos 2, unk 3,
the turn markers as user-defined symbols (ids 106 and 107 there; 4 and 5 here,
so code that hard-codes ids fails), byte fallback, digits split one by one,
no normalisation and no dummy prefix. The text below mixes English with rare
multi-byte characters, which fall back to UTF-8 byte pieces.

Training is deterministic (one thread, the model written from memory, so no
path ends up in it): the same arguments give the same file, byte for byte.
"""

from __future__ import annotations

from pathlib import Path

import rgemma.tokenizer

TEXT = """\
The recurrent model reads one token at a time and keeps a state of fixed size.
Its memory does not grow with the length of the conversation, which is why it is cheap to run.
Attention layers look back over a local window of recent tokens; the recurrent layers carry the rest.
A good tokenizer turns text into pieces that appear often: words, parts of words, and single letters.
When a character was never seen in training, its UTF-8 bytes are used instead of an unknown token.
Numbers such as 2024, 3.14159 and 1,000,000 are split into single digits before anything else.
She said: "Let's meet at the café near the station at 10:30, then walk to the museum."
The naïve approach re-decodes every token from the start, which is slow for long generations.
In Zürich, São Paulo and Kraków the façades glow at dusk; señor Núñez orders crème brûlée.
Ελληνικά, русский текст, and العربية appear here only once, so most of them become bytes.
日本語のテキストと中文文本也在这里。東京で会いましょう。
Emoji are rare too: 🙂 🚀 👍🏽 🎉 and the family 👨‍👩‍👧 made of several code points.
Questions, answers, instructions and replies: the chat format wraps each turn in markers.
user
What is the capital of France?
model
The capital of France is Paris. It is known for its museums, its food and the river Seine.
user
Write a short poem about the sea.
model
Waves roll in and waves roll out,
the tide keeps time without a doubt.
user
What should I buy?
model
- apples
- bread
- milk
- eggs and cheese
- tea
**Total:** five things.
    Indented lines keep their spaces, and	tabs stay tabs.
def add(a, b):
    return a + b  # a comment in code
print("hello, world")
for i in range(10): total += i * i
The quick brown fox jumps over the lazy dog while the five boxing wizards jump quickly.
Pack my box with five dozen liquor jugs; how vexingly quick daft zebras jump.
Sphinx of black quartz, judge my vow. A wizard's job is to vex chumps quickly in fog.
Training, evaluation, generation, tokenization, streaming, sampling, temperature, probability.
The weather today is sunny with a light breeze from the west, and tomorrow it may rain.
Reading a book by the window on a quiet afternoon is one of the simple pleasures of life.
"""


def train_tokenizer(
    directory: Path, vocab_size: int = 512, *, add_dummy_prefix: bool = False, turn_markers: bool = True
) -> Path:
    """Train the model into `directory`; returns the path of its tokenizer.model.

    The model has exactly `vocab_size` pieces (about 360 to 1600 are possible).

    `add_dummy_prefix=True` gives a Llama-style model instead, whose decoder drops
    the leading space of the first piece; `turn_markers=False` one that is not a
    chat model.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lines = TEXT.splitlines()
    # Multi-line sentences, so pieces around newlines are learnt as in chat text.
    sentences = lines + ["\n".join(lines[i : i + 4]) for i in range(0, len(lines), 4)]
    return rgemma.tokenizer.train_tokenizer(
        sentences, directory / "tokenizer.model", vocab_size,
        add_dummy_prefix=add_dummy_prefix, turn_markers=turn_markers, character_coverage=0.98,
    )
