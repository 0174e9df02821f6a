"""A character-level tokenizer for the zoo, built with ``tokenizers`` and loadable offline.

Every character of :data:`ALPHABET` is one token; encoding prepends ``<s>`` (as the models are
trained), decoding joins characters without spaces.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
ALPHABET = string.ascii_lowercase + string.digits + "+-=: \n"


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Return the zoo tokenizer (pad 0, bos 1, eos 2, unk 3, then one id per alphabet character)."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in ALPHABET:
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        unk_token="<unk>", model_max_length=128, padding_side="right")


def save_tokenizer(tok, path: Path) -> None:
    """Save ``tok`` so that transformers 4.x loads it too (5.x writes ``TokenizersBackend``)."""
    tok.save_pretrained(path)
    cfg_path = Path(path) / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
