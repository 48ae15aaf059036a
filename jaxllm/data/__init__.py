"""Data: text sources, tokenizers, packing, grain pipelines, and global-batch placement."""
from jaxllm.data.pretrain import PretrainData, check_vocab, pack_row, to_global
from jaxllm.data.sources import DataError, read_documents
from jaxllm.data.tokenizer import (ByteTokenizer, SentencePieceTokenizer, load_tokenizer,
                                   train_sentencepiece)

__all__ = ["PretrainData", "check_vocab", "pack_row", "to_global", "DataError", "read_documents",
           "ByteTokenizer", "SentencePieceTokenizer", "load_tokenizer", "train_sentencepiece"]
