"""`poelm data build|chat|climbmix` and `poelm tokenizer train`: corpora, chat data and the
tokenizer, each written atomically."""

from __future__ import annotations

import argparse
import json

from poelm.cli.common import emit
from poelm.flags import at_least


def data_build_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", default="default", help="'default' (Shakespeare, Milton, King James) or a PATH")
    p.add_argument("--out", default="data/default", help="output directory of shards")


def data_chat_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", required=True,
                   help="recall (King James verses), dialogue (speech -> next speech in the plays) or a JSONL file "
                        "of {\"messages\": [...]}")
    p.add_argument("--out", required=True, help="output directory of chat shards (last shard = held out)")


def data_climbmix_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shards", type=at_least(1), required=True, help="number of training shards")
    p.add_argument("--out", default="data/climbmix", help="output directory of shards")
    p.add_argument("--base-url", default=None, help="mirror URL of the shard files (default: the hub dataset)")


def tokenizer_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="corpus directory (parquet shards)")
    p.add_argument("--vocab-size", type=int, default=32768, help="tokens in the vocabulary (256 bytes + merges + 9 specials)")
    p.add_argument("--max-chars", type=at_least(1), default=2_000_000_000, help="train on at most this many characters")
    p.add_argument("--out", required=True, help="tokenizer directory to write (replaced atomically; an existing one only "
                   "if it is a previous `poelm tokenizer train` output, or with --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out that is not a poelm tokenizer")


def cmd_data_build(args: argparse.Namespace) -> int:
    from poelm import corpus

    stats = corpus.build_corpus(args.source, args.out)
    emit(args, stats, f"corpus written to {args.out}: {json.dumps(stats, default=str)}")
    return 0


def cmd_data_chat(args: argparse.Namespace) -> int:
    """`poelm data chat --source recall|dialogue|FILE.jsonl --out DIR [--json]`."""
    from poelm.chatdata import build_chat_data

    stats = build_chat_data(args.source, args.out)
    emit(args, stats, f"chat data written to {args.out}: {stats['train_conversations']} train + "
                      f"{stats['val_conversations']} held-out conversations from {stats['sources']}")
    return 0


def cmd_data_climbmix(args: argparse.Namespace) -> int:
    from poelm import corpus

    kw = {"base_url": args.base_url} if args.base_url else {}
    stats = corpus.download_climbmix(args.shards, args.out, **kw)
    emit(args, stats if isinstance(stats, dict) else {"out": args.out}, f"ClimbMix shards in {args.out}")
    return 0


def cmd_tokenizer_train(args: argparse.Namespace) -> int:
    import time
    from poelm import corpus
    from poelm.atomic import atomic_dir
    from poelm.checkpoint import check_replaceable
    from poelm.outputs import TOKENIZER_KIND, mark_output
    from poelm.tokenizer import Tokenizer

    check_replaceable(args.out, sources=(args.data,), overwrite=args.overwrite, kinds=(TOKENIZER_KIND,))
    train_files, _ = corpus.list_shards(args.data)
    texts = _cap_chars(corpus.iter_documents(train_files), args.max_chars)
    t0 = time.time()
    tok = Tokenizer.train(texts, args.vocab_size)
    with atomic_dir(args.out) as tmp:
        tok.save(tmp)
        mark_output(tmp, TOKENIZER_KIND)
    result = {"out": args.out, "vocab_size": tok.vocab_size, "seconds": round(time.time() - t0, 2)}
    emit(args, result, f"tokenizer with {tok.vocab_size} tokens written to {args.out} in {result['seconds']} s")
    return 0


def _cap_chars(texts, max_chars: int):
    seen = 0
    for t in texts:
        if seen >= max_chars:
            return
        seen += len(t)
        yield t
