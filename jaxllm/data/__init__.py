"""Data: text sources, tokenizers, packing, grain pipelines, and global-batch placement."""
from jaxllm.data.global_batch import check_vocab, to_global
from jaxllm.data.packing import PackedRows, pack_rows, token_stream
from jaxllm.data.pretrain import PretrainData, split_documents, train_split
from jaxllm.data.sources import DataError, read_documents
from jaxllm.data.tokenizer import (ByteTokenizer, SentencePieceTokenizer, load_tokenizer,
                                   train_sentencepiece)

__all__ = ["DataError", "read_documents", "ByteTokenizer", "SentencePieceTokenizer",
           "load_tokenizer", "train_sentencepiece", "PretrainData", "split_documents", "train_split",
           "PackedRows", "pack_rows", "token_stream", "check_vocab", "to_global"]
