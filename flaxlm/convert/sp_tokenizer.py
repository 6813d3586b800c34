"""A Hugging Face tokenizer for a SentencePiece run, for `convert to-hf`.

The model file goes in as `tokenizer.model` with a `tokenizer_config.json` naming
`LlamaTokenizer`, the way Llama's own SentencePiece tokenizers are published: `AutoTokenizer`
loads it and encodes as flaxlm does (byte fallback included) for models trained with
`flaxlm tokenizer train`, whose text is not normalized. Hugging Face's Metaspace step adds no
extra word boundary in front of text that already starts with a space, where SentencePiece
does; text that starts otherwise encodes to the same ids.
"""

from __future__ import annotations

import json
from pathlib import Path


def write_sentencepiece_tokenizer(model_file: Path, directory: Path) -> list[str]:
    """Writes tokenizer.model, tokenizer_config.json and special_tokens_map.json into directory;
    returns warnings for a model that Hugging Face's Llama tokenizer will not read alike."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2

    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    specials = {
        name: sp.id_to_piece(i)
        for name, i in [
            ("unk_token", sp.unk_id()),
            ("bos_token", sp.bos_id()),
            ("eos_token", sp.eos_id()),
            ("pad_token", sp.pad_id()),
        ]
        if i >= 0
    }
    config = {
        "tokenizer_class": "LlamaTokenizer",
        # flaxlm adds BOS/EOS per document in the data pipeline, not per encode call.
        "add_bos_token": False,
        "add_eos_token": False,
        "legacy": True,
        "clean_up_tokenization_spaces": False,
        **specials,
    }
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokenizer.model").write_bytes(Path(model_file).read_bytes())
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (directory / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(sp.serialized_model_proto())
    norm = proto.normalizer_spec
    if norm.name != "identity" or norm.remove_extra_whitespaces:
        return [
            f"the SentencePiece model normalizes text ({norm.name}, remove_extra_whitespaces="
            f"{norm.remove_extra_whitespaces}), which Hugging Face's LlamaTokenizer does not: "
            "ids can differ on spaces and Unicode forms (models from `flaxlm tokenizer train` "
            "keep text as written)"
        ]
    return []
