"""A word-level tokenizer built from a corpus: for small LMs over a closed vocabulary (the shape scenes).

Words and punctuation runs are tokens (the `Whitespace` pre-tokenizer's ``\\w+|[^\\w\\s]+``); unknown words map to
``<unk>``; ``<pad>``, ``<s>``, ``</s>`` and ``<image>`` are special. Decoding joins tokens with spaces.
"""
from __future__ import annotations

from typing import Iterable

SPECIALS = ("<pad>", "<s>", "</s>", "<unk>", "<image>")


def word_tokenizer(texts: Iterable[str], *, min_count: int = 1):
    """A `PreTrainedTokenizerFast` whose vocabulary is every word of ``texts`` seen ``min_count`` times."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    trainer = trainers.WordLevelTrainer(special_tokens=list(SPECIALS), min_frequency=min_count)
    tok.train_from_iterator((t.replace("<image>", " ") for t in texts), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", extra_special_tokens={"image_token": "<image>"})
