"""BestFitLoader: row invariants, best fit vs naive packing, rank sharding, exact resume."""

import json
import random
import re
import warnings

import pytest
import torch

from poelm.corpus import write_corpus
from poelm.dataloader import BestFitLoader, default_eval_tokens, val_batches
from poelm.tokenizer import Tokenizer

T = 64


def make_docs(n=400, seed=0):
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghijklmnop") for _ in range(rng.randint(2, 7))) for _ in range(200)]
    docs = []
    for i in range(n):
        length = rng.choice([rng.randint(1, 6), rng.randint(5, 20), rng.randint(15, 50)])
        docs.append(f"doc{i} " + " ".join(rng.choice(words) for _ in range(length)))
    return docs


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    docs = make_docs()
    write_corpus(docs, d, n_train_shards=3, row_group_docs=16)
    tok = Tokenizer.train(docs, 320)
    return d, tok, docs


def rows_of(x, y):
    return torch.cat([x, y[:, -1:]], dim=1)  # (B, T+1)


def segments(row, bos):
    starts = [i for i, t in enumerate(row) if t == bos]
    return [row[a:b] for a, b in zip(starts, starts[1:] + [len(row)])]


def doc_ids(tok, docs):
    """tokens -> id for whole documents, and a lookup of the documents a prefix may come from."""
    toks = tok.encode_batch(docs, prepend_bos=True)
    whole = {tuple(t): i for i, t in enumerate(toks)}

    def candidates(seg):
        return [i for i, t in enumerate(toks) if t[:len(seg)] == seg]
    return whole, candidates


def test_rows_are_packed_documents(setup):
    d, tok, docs = setup
    whole, candidates = doc_ids(tok, docs)
    loader = BestFitLoader(d, tok, batch_size=4, seq_len=T, loop=False, buffer_docs=50)
    seen, n_rows = [], 0
    for x, y in loader:
        assert x.shape == y.shape == (4, T) and x.dtype == y.dtype == torch.long
        assert torch.equal(x[:, 1:], y[:, :-1])
        for row in rows_of(x, y).tolist():
            n_rows += 1
            assert len(row) == T + 1 and row[0] == tok.bos_token_id
            segs = segments(row, tok.bos_token_id)
            seen += [whole[tuple(s)] for s in segs[:-1]]  # whole documents (KeyError otherwise) ...
            last = candidates(segs[-1])  # ... then one that may be cropped: a prefix of some doc
            assert last
            if len(last) == 1:
                seen.append(last[0])
    assert len(seen) == len(set(seen))  # no document used twice in one pass
    assert n_rows == loader.rows > 50
    assert 0 < loader.cropped_fraction < 0.5


def naive_cropped_fraction(token_docs, row_len):
    """Sequential packing: place documents in order, crop the one that overflows the row."""
    dropped = emitted = room = 0
    for toks in token_docs:
        if room == 0:
            room = row_len
        take = min(len(toks), room)
        emitted += take
        dropped += len(toks) - take
        room -= take
    return dropped / (dropped + emitted)


def test_best_fit_beats_naive(setup):
    d, tok, docs = setup
    loader = BestFitLoader(d, tok, batch_size=4, seq_len=T, loop=False)
    for _ in loader:
        pass
    naive = naive_cropped_fraction(tok.encode_batch(docs, prepend_bos=True), T + 1)
    assert loader.cropped_fraction < 0.8 * naive


def pass_doc_ids(loader, tok):
    """Ids of the documents a loader's pass places (from the 'docN' text they start with)."""
    ids = set()
    for x, y in loader:
        for row in rows_of(x, y).tolist():
            for s in segments(row, tok.bos_token_id):
                m = re.match(r"doc(\d+) ", tok.decode(s[1:]))
                if m:  # a cropped prefix may be too short to name its document
                    ids.add(int(m.group(1)))
    return ids


@pytest.mark.parametrize("split", ["train", "val"])
def test_ranks_read_disjoint_data(setup, split):
    d, tok, _ = setup
    loaders = [BestFitLoader(d, tok, 2, T, split=split, rank=r, world_size=2, loop=False, buffer_docs=8)
               for r in range(2)]
    if split == "train":  # 3 shards x several row groups: split by row group
        units = [set(ld.units) for ld in loaders]
        assert not units[0] & units[1] and len(units[0]) + len(units[1]) > 10
    else:  # the 20-doc validation shard has 2 row groups of <= 16 docs: one per rank
        assert all(not ld.doc_split for ld in loaders)
    a, b = (pass_doc_ids(ld, tok) for ld in loaders)
    assert a and b and not a & b


def test_doc_split_when_few_row_groups(setup):
    d, tok, _ = setup
    loaders = [BestFitLoader(d, tok, 1, 16, split="val", rank=r, world_size=3, loop=False) for r in range(3)]
    assert all(ld.doc_split for ld in loaders)  # 2 row groups < 3 ranks
    ids = [pass_doc_ids(ld, tok) for ld in loaders]
    assert all(ids) and not (ids[0] & ids[1] or ids[1] & ids[2] or ids[0] & ids[2])


@pytest.mark.parametrize("rank, world_size, skip", [(0, 1, 3), (0, 1, 150), (1, 2, 25), (0, 1, 0)])
def test_resume_is_exact(setup, rank, world_size, skip):
    d, tok, _ = setup
    kw = dict(rank=rank, world_size=world_size, buffer_docs=30)
    a = BestFitLoader(d, tok, 4, T, **kw)
    for _ in range(skip):  # 150 batches cross an epoch boundary
        next(a)
    state = json.loads(json.dumps(a.state_dict()))  # JSON-able
    assert len(json.dumps(state)) < 4000
    b = BestFitLoader(d, tok, 4, T, state=state, **kw)
    for _ in range(12):
        xa, ya = next(a)
        xb, yb = next(b)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert a.state_dict() == b.state_dict()
    assert a.cropped_fraction == b.cropped_fraction
    if skip == 150:
        assert state["epoch"] >= 1


def test_resume_with_other_world_size_is_approximate(setup):
    d, tok, _ = setup
    a = BestFitLoader(d, tok, 4, T)
    for _ in range(5):
        next(a)
    with pytest.warns(UserWarning, match="approximately"):
        b = BestFitLoader(d, tok, 4, T, rank=1, world_size=2, state=a.state_dict())
    x, y = next(b)
    assert x.shape == (4, T)
    with pytest.raises(ValueError, match="not a BestFitLoader state"):
        BestFitLoader(d, tok, 4, T, state={"foo": 1})


def test_val_budget_and_max_rows(setup):
    d, tok, _ = setup
    batches = list(val_batches(d, tok, 2, T, n_tokens=2 * T * 3))
    assert len(batches) == 3
    again = list(val_batches(d, tok, 2, T, n_tokens=2 * T * 3))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))  # fixed eval set
    loader = BestFitLoader(d, tok, 2, T, max_rows=7)
    assert len(list(loader)) == 3 and loader.rows == 6


def test_val_budget_is_capped_at_the_split(setup):
    """A budget larger than the split: each validation row once (the last batch may be short),
    one warning naming the budget and the split's size."""
    d, tok, _ = setup
    one_pass = [x for x, _ in BestFitLoader(d, tok, 1, T, split="val", loop=False)]  # every row of the split, once
    assert len(one_pass) == 12
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = list(val_batches(d, tok, 5, T, n_tokens=5 * T * 200))
    assert [len(x) for x, _ in batches] == [5, 5, 2]
    assert torch.equal(torch.cat([x for x, _ in batches]), torch.cat(one_pass))
    rows = [tuple(r) for x, y in batches for r in rows_of(x, y).tolist()]
    assert len(set(rows)) == len(rows) == 12  # no row twice
    assert sum(y.numel() for _, y in batches) == 12 * T
    msgs = [str(w.message) for w in caught]
    assert msgs == [f"validation split of {d} holds only {12 * T:,} tokens at seq_len {T}, less than the "
                    f"{5 * T * 200:,}-token eval budget: each of its tokens is evaluated once"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a budget the split covers: no warning
        assert sum(len(x) for x, _ in val_batches(d, tok, 4, T, n_tokens=12 * T)) == 12
    with pytest.raises(ValueError, match="less than one row of seq_len"):
        list(val_batches(d, tok, 2, 10 ** 5, n_tokens=10))
    with pytest.raises(ValueError, match="budget must be >= 1"):
        list(val_batches(d, tok, 2, T, n_tokens=0))


def test_default_eval_budget_suits_the_device():
    assert default_eval_tokens("cpu") == 2 ** 16
    assert default_eval_tokens(torch.device("cuda", 1)) == default_eval_tokens("cuda:0") == 80 * 2 ** 19
    assert default_eval_tokens("auto") == (80 * 2 ** 19 if torch.cuda.is_available() else 2 ** 16)


def test_warns_once_when_cropping_drops_most_tokens(tmp_path, setup):
    _, tok, docs = setup
    giant = [" ".join(docs[i:i + 60]) for i in range(0, 360, 60)]  # 6 documents of ~1,500 tokens, rows of 65
    write_corpus(giant, tmp_path, n_train_shards=1)
    loader = BestFitLoader(tmp_path, tok, 2, T)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(10):
            next(loader)
    assert loader.cropped_fraction > 0.9
    assert len(caught) == 1 and re.match(rf"train split of {re.escape(str(tmp_path))}: cropping has dropped "
                                         r"9\d\.\d% of the tokens", str(caught[0].message))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the packed corpus of the other tests crops little at T = 64
        normal = BestFitLoader(setup[0], tok, 4, T)
        for _ in range(20):
            next(normal)
        assert normal.cropped_fraction < 0.5


def test_errors(setup, tmp_path):
    d, tok, _ = setup
    with pytest.raises(FileNotFoundError, match="no .parquet shards"):
        BestFitLoader(tmp_path, tok, 2, T)
    with pytest.raises(ValueError, match="split"):
        BestFitLoader(d, tok, 2, T, split="test")
    with pytest.raises(ValueError, match="rank"):
        BestFitLoader(d, tok, 2, T, rank=2, world_size=2)
