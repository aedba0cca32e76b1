import json
import re

import pytest
import torch

from core import assets, data
from core.errors import DataError


class WordTokenizer:
    """Tokenizer-like stand-in: one id per whitespace-separated word, the id being the word's position."""

    name_or_path = ""

    def __call__(self, text, add_special_tokens=True):
        assert add_special_tokens is False
        return {"input_ids": list(range(len(text.split())))}


def have_brown():
    return (assets.brown_dir() / "cats.txt").exists()


needs_brown = pytest.mark.skipif(not have_brown(), reason="Brown corpus not fetched (bash scripts/setup.sh)")


# --- detokenizer -------------------------------------------------------------------------------

def detok(line):
    return data.detokenize(data.strip_tags(line))


def test_strip_tags_uses_last_slash():
    assert data.strip_tags("\tThe/at 1/2/cd and/or/cc ./.") == ["The", "1/2", "and/or", "."]


def test_detokenize_quotes_and_punctuation():
    line = ("\tThe/at Fulton/np-tl County/nn-tl Grand/jj-tl Jury/nn-tl said/vbd Friday/nr an/at "
            "investigation/nn of/in Atlanta's/np$ recent/jj primary/nn election/nn produced/vbd ``/`` "
            "no/at evidence/nn ''/'' that/cs any/dti irregularities/nns took/vbd place/nn ./.")
    assert detok(line) == ("The Fulton County Grand Jury said Friday an investigation of Atlanta's recent "
                           'primary election produced "no evidence" that any irregularities took place.')


def test_detokenize_quote_after_comma_and_before_period():
    line = ("\t``/`` Only/rb a/at relative/jj handful/nn ''/'' ,/, the/at jury/nn said/vbd ,/, "
            "``/`` considering/in the/at size/nn of/in this/dt city/nn ''/'' ./.")
    assert detok(line) == '"Only a relative handful", the jury said, "considering the size of this city".'


def test_detokenize_parens_semicolon_question_and_clitics():
    line = "Was/bedz it/pps (/( really/rb )/) hers/pp$$ ;/. he/pps did/dod n't/* know/vb 's/bez ?/."
    assert detok(line) == "Was it (really) hers; he didn't know's?"


def test_detokenize_single_quotes_alternate():
    line = "he/pps said/vbd ,/, '/' Don't/do* worry/vb '/' ./."
    assert detok(line) == "he said, 'Don't worry'."


def test_detokenize_drops_doubled_abbreviation_period():
    assert detok("won/vbn by/in Ivan/np Allen/np Jr./np ./.") == "won by Ivan Allen Jr."


def test_brown_file_text_paragraphs_and_sentences():
    raw = ("\n\n\tThe/at jury/nn said/vbd so/rb ./.\n\tIt/pps rained/vbd ./.\n\n\n"
           "\t``/`` Yes/rb ''/'' ,/, he/pps said/vbd ./.\n")
    assert data.brown_file_text(raw) == 'The jury said so. It rained.\n\n"Yes", he said.'


# --- split -------------------------------------------------------------------------------------

def test_split_file_is_disjoint_complete_and_stratified():
    split = json.loads(data.SPLIT_PATH.read_text())
    ev, cal, genres = set(split["eval"]), set(split["calibration"]), split["genres"]
    assert split["protocol"]
    assert len(genres) == 500 and all(re.fullmatch(r"c[a-r]\d\d", f) for f in genres)
    assert not ev & cal
    assert ev | cal == set(genres)
    assert len(ev) == 100
    all_genres = set(genres.values())
    assert len(all_genres) == 15
    assert {genres[f] for f in ev} == all_genres
    assert {genres[f] for f in cal} == all_genres
    assert split["eval"] == sorted(split["eval"]) and split["calibration"] == sorted(split["calibration"])


def test_split_file_matches_its_protocol():
    split = json.loads(data.SPLIT_PATH.read_text())
    assert data.make_split(split["genres"]) == split


@needs_brown
def test_split_genres_match_corpus_cats():
    assert data.brown_genres(assets.brown_dir()) == data.brown_split()["genres"]


@needs_brown
def test_brown_eval_text_starts_with_first_eval_file():
    split = data.brown_split()
    first = data.brown_file_text((assets.brown_dir() / split["eval"][0]).read_text())
    text = data.load_corpus_text("brown", "eval")
    assert text.startswith(first + "\n\n")
    assert "/at " not in text and "``" not in text


# --- corpus files and errors ------------------------------------------------------------------

def test_text_file_corpus_is_used_for_both_splits(tmp_path):
    p = tmp_path / "c.txt"
    p.write_text("héllo world\n", encoding="utf-8")
    assert data.load_corpus_text(str(p), "eval") == data.load_corpus_text(str(p), "calibration") == "héllo world\n"


def test_missing_corpus_file(tmp_path):
    with pytest.raises(DataError, match="Corpus file not found"):
        data.load_corpus_text(str(tmp_path / "nope.txt"), "eval")


@pytest.mark.parametrize("content", ["", "  \n\t\n"])
def test_empty_corpus_file(tmp_path, content):
    p = tmp_path / "empty.txt"
    p.write_text(content)
    with pytest.raises(DataError, match="empty"):
        data.load_corpus_text(str(p), "eval")


def test_undecodable_corpus_file(tmp_path):
    p = tmp_path / "bin.txt"
    p.write_bytes(b"abc \xff\xfe\x80 def")
    with pytest.raises(DataError, match="UTF-8"):
        data.load_corpus_text(str(p), "calibration")


def test_unknown_split(tmp_path):
    with pytest.raises(DataError, match="split"):
        data.load_corpus_text("brown", "train")


# --- windows -----------------------------------------------------------------------------------

def words(n):
    return " ".join(f"w{i}" for i in range(n))


def test_token_windows_evenly_spaced_non_overlapping():
    w = data.token_windows(WordTokenizer(), words(105), window_len=10, n_windows=4)
    assert w.dtype == torch.long and w.shape == (4, 10)
    # 10 full windows (tail of 5 dropped); linspace(0, 9, 4).round() -> 0, 3, 6, 9
    assert w[:, 0].tolist() == [0, 30, 60, 90]
    assert w[0].tolist() == list(range(10))


def test_token_windows_fewer_than_asked_uses_all():
    w = data.token_windows(WordTokenizer(), words(35), window_len=10, n_windows=8)
    assert w[:, 0].tolist() == [0, 10, 20]


def test_token_windows_single_window_is_first():
    w = data.token_windows(WordTokenizer(), words(100), window_len=10, n_windows=1)
    assert w.tolist() == [list(range(10))]


def test_token_windows_too_short():
    with pytest.raises(DataError, match="Text too short: 7 tokens for window length 10"):
        data.token_windows(WordTokenizer(), words(7), window_len=10, n_windows=2)


def test_eval_and_calibration_windows_from_file(tmp_path):
    p = tmp_path / "c.txt"
    p.write_text(words(1000))
    tok = WordTokenizer()
    ev = data.eval_windows(tok, str(p), 10, 5)
    assert ev[:, 0].tolist() == [0, 250, 500, 740, 990]
    c0 = data.calibration_windows(tok, str(p), 10, 20, seed=0)
    assert c0.shape == (20, 10)
    assert len(set(c0[:, 0].tolist())) == 20 and all(s % 10 == 0 for s in c0[:, 0].tolist())
    assert torch.equal(c0, data.calibration_windows(tok, str(p), 10, 20, seed=0))
    assert not torch.equal(c0, data.calibration_windows(tok, str(p), 10, 20, seed=1))


@pytest.mark.model
@pytest.mark.skipif(not (assets.default_model_dir().exists() and have_brown()),
                    reason="default model or Brown corpus not fetched (bash scripts/setup.sh)")
def test_brown_windows_with_real_tokenizer():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(assets.default_model_dir())
    ev = data.eval_windows(tok, "brown", 256, 16)
    assert ev.shape == (16, 256)
    text = data.load_corpus_text("brown", "eval")
    # a prefix long enough for 256 tokens tokenizes like the whole text up to there
    assert ev[0].tolist() == tok(text[:4000], add_special_tokens=False)["input_ids"][:256]
    assert tok.decode(ev[0]).startswith(text[:40])
    assert torch.equal(ev, data.eval_windows(tok, "brown", 256, 16))


# --- on-disk cache of token ids -----------------------------------------------------------------

class CountingTokenizer:
    """A named tokenizer stand-in (so ids are cached) that counts how often it tokenizes."""

    name_or_path = "counting"

    def __init__(self, vocab_offset=0):
        self.calls, self.offset = 0, vocab_offset

    def __len__(self):
        return 100

    def get_vocab(self):
        return {f"w{i}": i + self.offset for i in range(100)}

    def __call__(self, text, add_special_tokens=True):
        assert add_special_tokens is False
        self.calls += 1
        return {"input_ids": [len(w) + self.offset for w in text.split()]}


@pytest.fixture
def disk_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(data, "_IDS_CACHE", type(data._IDS_CACHE)())  # no in-memory hits
    return tmp_path / "cache" / "token_ids"


def test_token_ids_cached_on_disk(tmp_path, disk_cache):
    p = tmp_path / "c.txt"
    p.write_text("a bb ccc dddd " * 50)
    tok = CountingTokenizer()
    first = data._corpus_ids(tok, str(p), "calibration")
    assert tok.calls == 1 and len(list(disk_cache.glob("*.pt"))) == 1
    data._IDS_CACHE.clear()  # a new process: only the disk cache is left
    again = data._corpus_ids(tok, str(p), "calibration")
    assert tok.calls == 1 and again.dtype == torch.long and torch.equal(first, again)
    assert torch.equal(first, data._encode(tok, p.read_text()))


def test_token_ids_cache_key_follows_text_and_tokenizer(tmp_path, disk_cache):
    p = tmp_path / "c.txt"
    p.write_text("a bb ccc " * 50)
    tok = CountingTokenizer()
    data._corpus_ids(tok, str(p), "eval")
    p.write_text("a bb ccc eeeee " * 50)  # the file changed: a new key, tokenized again
    data._IDS_CACHE.clear()
    ids = data._corpus_ids(tok, str(p), "eval")
    assert tok.calls == 2 and ids[3].item() == 5
    other = CountingTokenizer(vocab_offset=1)  # same name, different vocabulary: a new key
    data._IDS_CACHE.clear()
    assert data._corpus_ids(other, str(p), "eval")[0].item() == 2 and other.calls == 1
    assert len(list(disk_cache.glob("*.pt"))) == 3


def test_token_ids_cache_survives_a_broken_file(tmp_path, disk_cache):
    p = tmp_path / "c.txt"
    p.write_text("a bb ccc " * 50)
    tok = CountingTokenizer()
    first = data._corpus_ids(tok, str(p), "eval")
    for f in disk_cache.glob("*.pt"):
        f.write_bytes(b"not a tensor")
    data._IDS_CACHE.clear()
    assert torch.equal(first, data._corpus_ids(tok, str(p), "eval")) and tok.calls == 2
