"""A Hugging Face `tokenizer.json` equal to flaxlm's byte tokenizer, for `convert to-hf`.

Byte ids are the byte values (0..255), then BOS 256, EOS 257, PAD 258 (and for an encoder,
[MASK] 259, `flaxlm.data.masking`). The file is a byte-level
BPE without merges: each byte is one token whose id is its value, so `AutoTokenizer` encodes
text to its UTF-8 bytes and decodes ids back (invalid UTF-8 as U+FFFD), as flaxlm does.
"""

from __future__ import annotations

import json
from pathlib import Path

from flaxlm.config import BYTE_MASK_ID
from flaxlm.data.tokenizer import ByteTokenizer

SPECIAL_TOKENS = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"}
MASK_TOKEN = "[MASK]"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in character of every byte (what the ByteLevel steps use)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    chars, n = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + n)
            n += 1
    return chars


def write_byte_tokenizer(directory: Path, mask: bool = False) -> None:
    """Writes tokenizer.json, tokenizer_config.json and special_tokens_map.json into directory
    (with `mask`, also the masked-LM token [MASK] as id 259)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {char: b for b, char in _bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    # Added in id order: BOS 256, EOS 257, PAD 258, as ByteTokenizer numbers them.
    specials = {**SPECIAL_TOKENS, **({"mask_token": MASK_TOKEN} if mask else {})}
    tok.add_special_tokens([AddedToken(t, special=True) for t in specials.values()])
    byte = ByteTokenizer()
    assert not mask or tok.token_to_id(MASK_TOKEN) == BYTE_MASK_ID
    assert tok.token_to_id(SPECIAL_TOKENS["bos_token"]) == byte.bos_id
    assert tok.token_to_id(SPECIAL_TOKENS["pad_token"]) == byte.pad_id
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **specials}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (directory / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
