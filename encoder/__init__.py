"""Japanese BPE encoder of the released gpt2ja models.

    import encoder
    enc = encoder.load()            # $GPT2JA_VOCAB, then this package's directory
    ids = enc.encode("今日は良い天気です。")
    text = enc.decode(ids)
"""
from .bpe import EMOJI_FILE, EOS_TOKEN, VOCAB_FILE, EncodeError, Encoder, VocabError, clean_text, find_vocab, load

__all__ = ["Encoder", "EncodeError", "VocabError", "load", "find_vocab", "clean_text", "VOCAB_FILE", "EMOJI_FILE", "EOS_TOKEN"]
