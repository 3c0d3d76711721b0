"""core_jax.text: CLIP tokenizer rebuilt offline, placeholders, prompt ids, context alignment."""

import functools
import gzip
import importlib.util
import json
import math
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest

from core_jax.text import (
    add_placeholder_tokens,
    caption_ids,
    clip_tokenizer_dir,
    load_templates,
    load_tokenizer,
    placeholder_slots,
    placeholder_string,
    regularization_prompts,
    super_category_ids,
    tokenize,
)
from core_jax.text.derive_vocab import derive_merges, merges_gz_bytes
from core_jax.text.vocab import read_merges

BOS, EOS = 49406, 49407
SENTENCES = [
    "a photo of a cat",
    "A TEDDY bear,   on the beach!!",
    "It's 2024: the café's crème brûlée costs $5.99 -- wow...",
    "an oil-painting of a corgi wearing sunglasses, trending on artstation",
    "naïve façade 🍰🐶 日本語 dog's",
]


@pytest.fixture
def tok():
    return load_tokenizer()


def _open_clip_gz() -> Path | None:
    # find_spec locates the package without importing it (its import needs torchvision).
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"
    return path if path.is_file() else None


def _scratch_byte_symbols() -> tuple[list[str], dict[int, str]]:
    keep = [b for b in range(256) if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255]
    rest = [b for b in range(256) if b not in keep]
    table = {b: chr(b) for b in keep} | {b: chr(256 + k) for k, b in enumerate(rest)}
    return [table[b] for b in keep + rest], table


def _scratch_vocab(merges: list[str]) -> list[str]:
    symbols, _ = _scratch_byte_symbols()
    words = symbols + [s + "</w>" for s in symbols] + [m.replace(" ", "") for m in merges]
    return words + ["<|startoftext|>", "<|endoftext|>"]


@functools.lru_cache(maxsize=1)
def _reference_tables() -> tuple[dict[str, int], dict[tuple[str, str], int]]:
    merges = read_merges()
    vocab = {w: i for i, w in enumerate(_scratch_vocab(merges))}
    return vocab, {tuple(m.split(" ")): r for r, m in enumerate(merges)}


def _reference_bpe(text: str) -> list[int]:
    """CLIP's SimpleTokenizer.encode re-implemented from its description (no ftfy)."""
    regex = pytest.importorskip("regex")
    _, byte_table = _scratch_byte_symbols()
    vocab, ranks = _reference_tables()
    pattern = regex.compile(
        r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
        regex.IGNORECASE,
    )
    ids = []
    for word in pattern.findall(" ".join(text.split()).lower()):
        parts = [byte_table[b] for b in word.encode("utf-8")]
        parts[-1] += "</w>"
        while len(parts) > 1:
            best = min(zip(parts, parts[1:], strict=False), key=lambda p: ranks.get(p, math.inf))
            if best not in ranks:
                break
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        ids += [vocab[p] for p in parts]
    return ids


# ---------------------------------------------------------------- tokenizer and vocabulary


def test_cat_ids(tok):
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tok.model_max_length == 77
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id == EOS
    assert len(tok) == 49408


def test_vocab_matches_scratch_derivation(tok):
    merges = read_merges()
    assert len(merges) == 48894
    assert tok.convert_ids_to_tokens(list(range(49408))) == _scratch_vocab(merges)
    folder = clip_tokenizer_dir()
    assert json.loads((folder / "vocab.json").read_text("utf-8")) == {
        w: i for i, w in enumerate(_scratch_vocab(merges))
    }
    assert (folder / "merges.txt").read_text("utf-8").split("\n")[:2] == ["#version: 0.2", "i n"]


def test_shipped_merges_reproducible_from_open_clip_file():
    source = _open_clip_gz()
    if source is None:
        pytest.skip("open_clip's bpe_simple_vocab_16e6.txt.gz is not installed")
    lines = gzip.decompress(source.read_bytes()).decode("utf-8").split("\n")
    assert derive_merges(source) == lines[1:48895] == read_merges()
    shipped = Path(__file__).parents[1] / "core_jax" / "text" / "clip_merges.txt.gz"
    assert merges_gz_bytes(derive_merges(source)) == shipped.read_bytes()


@pytest.mark.parametrize("text", SENTENCES)
def test_ids_match_reference_bpe(tok, text):
    assert tok.encode(text, add_special_tokens=False) == _reference_bpe(text)


def test_ids_match_open_clip_simple_tokenizer(tok):
    open_clip = pytest.importorskip("open_clip")
    ref = open_clip.tokenizer.SimpleTokenizer()
    for text in SENTENCES:
        assert tok.encode(text, add_special_tokens=False) == ref.encode(text), text


def test_cache_respects_xdg_and_falls_back(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    folder = clip_tokenizer_dir()
    assert folder.parent == tmp_path / "xdg" / "core_jax"
    assert sorted(p.name for p in folder.iterdir()) == [
        "merges.txt",
        "tokenizer_config.json",
        "vocab.json",
    ]
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    fallback = clip_tokenizer_dir()
    assert fallback.parent.parent == tmp_path / "tmp"
    assert load_tokenizer().encode("a photo of a cat")[1:-1] == [320, 1125, 539, 320, 2368]


def test_load_tokenizer_from_model_folder_keeps_its_padding(tmp_path):
    sub = tmp_path / "model" / "tokenizer"
    sub.mkdir(parents=True)
    src = clip_tokenizer_dir()
    for name in ("vocab.json", "merges.txt"):
        (sub / name).write_bytes((src / name).read_bytes())
    config = json.loads((src / "tokenizer_config.json").read_text())
    (sub / "tokenizer_config.json").write_text(json.dumps(config | {"pad_token": "!"}))
    sd2 = load_tokenizer(tmp_path / "model")
    assert sd2.pad_token_id == 0
    assert load_tokenizer(sub).pad_token_id == 0
    assert tokenize(sd2, "a cat")[0, :5].tolist() == [BOS, 320, 2368, EOS, 0]
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        load_tokenizer(tmp_path)


def test_tokenize_pads_and_truncates(tok):
    ids = tokenize(tok, ["a photo of a cat", "a dog"])
    assert ids.shape == (2, 77) and ids.dtype == np.int32
    assert ids[1, :4].tolist() == [BOS, 320, 1929, EOS] and (ids[1, 4:] == EOS).all()
    long_prompt = "a photo of " + "a very " * 50 + "cat"
    with pytest.warns(UserWarning, match="truncated to 77"):
        cut = tokenize(tok, long_prompt)
    assert cut.shape == (1, 77)
    assert cut[0, 0] == BOS and cut[0, -1] == EOS and (cut[0, :-1] != EOS).all()
    assert cut[0, :-1].tolist() == tok(long_prompt).input_ids[:76]


def test_super_category_ids(tok):
    assert super_category_ids(tok, "dog") == [1929]
    assert super_category_ids(tok, "teddy bear") == [11798, 4298]
    with pytest.raises(ValueError, match="no tokens"):
        super_category_ids(tok, "  ")


# ---------------------------------------------------------------- placeholders


def test_add_single_placeholder(tok):
    assert add_placeholder_tokens(tok, "<s*>") == [49408]
    assert placeholder_string("<s*>", 1) == "<s*>"
    assert tok("a <s*> dog").input_ids == [BOS, 320, 49408, 1929, EOS]
    assert caption_ids(tok, "<s*>")[:7].tolist() == [BOS, 320, 1125, 539, 320, 49408, EOS]


def test_add_multi_vector_placeholder(tok):
    ids = add_placeholder_tokens(tok, "<cat-toy>", 3)
    assert ids == [49408, 49409, 49410]
    text = placeholder_string("<cat-toy>", 3)
    assert text == "<cat-toy> <cat-toy>_1 <cat-toy>_2"
    # The longer "<cat-toy>_1" must not be read as "<cat-toy>" followed by "_1".
    assert tok.encode(f"a {text} on a table", add_special_tokens=False) == [
        320,
        *ids,
        525,
        320,
        2175,
    ]


def test_placeholder_refused_when_already_vocabulary(tok):
    add_placeholder_tokens(tok, "<s*>")
    with pytest.raises(ValueError, match="already in the tokenizer's vocabulary"):
        add_placeholder_tokens(tok, "<s*>")
    with pytest.raises(ValueError, match="already in the tokenizer's vocabulary"):
        add_placeholder_tokens(tok, "<|endoftext|>")
    with pytest.raises(ValueError, match="already in the tokenizer's vocabulary"):
        add_placeholder_tokens(tok, "dog")  # "dog" is a sub-word token besides "dog</w>"
    with pytest.raises(ValueError, match="already tokenizes as the existing token 'corgi</w>'"):
        add_placeholder_tokens(tok, "corgi")
    with pytest.raises(ValueError, match="whitespace"):
        add_placeholder_tokens(tok, "my dog")
    with pytest.raises(ValueError, match="num_vectors"):
        add_placeholder_tokens(tok, "<t>", 0)
    assert len(tok) == 49409


def test_placeholder_slots(tok):
    pids = add_placeholder_tokens(tok, "<s*>", 2)
    ids = tokenize(tok, ["a <s*> <s*>_1 dog", "<s*>_1 and a <s*>"])
    mask, slot = placeholder_slots(ids, pids)
    assert mask.shape == slot.shape == (2, 77) and slot.dtype == np.int32
    assert np.flatnonzero(mask[0]).tolist() == [2, 3] and slot[0, [2, 3]].tolist() == [0, 1]
    assert np.flatnonzero(mask[1]).tolist() == [1, 4] and slot[1, [1, 4]].tolist() == [1, 0]
    assert (slot[~mask] == 0).all()


# ---------------------------------------------------------------- context alignment


def _check_alignment(reg, n, expected_context, eos_obj, eos_cat):
    """Slots gather the same tokens on both sides, equal to expected_context, ending at EOS."""
    m = reg.context_mask[n]
    k = int(m.sum())
    assert m[:k].all() and not m[k:].any()
    obj_tokens = reg.obj_ids[n][reg.obj_index[n][:k]].tolist()
    cat_tokens = reg.cat_ids[n][reg.cat_index[n][:k]].tolist()
    assert obj_tokens == cat_tokens == expected_context
    # Indices increase and the last slot is the FIRST end-of-text, not padding.
    assert (np.diff(reg.obj_index[n][:k]) > 0).all() and (np.diff(reg.cat_index[n][:k]) > 0).all()
    assert reg.obj_index[n][k - 1] == eos_obj and reg.cat_index[n][k - 1] == eos_cat
    assert (reg.obj_index[n][k:] == 0).all() and (reg.cat_index[n][k:] == 0).all()


@pytest.mark.parametrize("num_vectors", [1, 3])
@pytest.mark.parametrize("category", ["dog", "teddy bear"])
@pytest.mark.parametrize("sd2_padding", [False, True])
def test_alignment_start_middle_end(tok, num_vectors, category, sd2_padding):
    if sd2_padding:
        tok.pad_token = "!"
        assert tok.pad_token_id == 0
    pids = add_placeholder_tokens(tok, "<s*>", num_vectors)
    text = placeholder_string("<s*>", num_vectors)
    templates = [
        "{} in the snow, watercolor",
        "a {} in the snow, watercolor",
        "a watercolor painting of a {}",
    ]
    reg = regularization_prompts(tok, templates, text, category)
    assert len(reg) == 3 and reg.templates == tuple(templates)
    for arr in (reg.obj_ids, reg.cat_ids, reg.obj_index, reg.cat_index, reg.context_mask):
        assert arr.shape == (3, 77)
    assert reg.context_mask.dtype == bool and reg.obj_index.dtype == np.int32

    v, c = num_vectors, super_category_ids(tok, category)
    k = len(c)
    for n, template in enumerate(templates):
        before, after = template.split("{}")
        pre = tok.encode(before, add_special_tokens=False)
        post = tok.encode(after, add_special_tokens=False)
        assert reg.obj_ids[n][: len(pre) + v + len(post) + 2].tolist() == (
            [BOS, *pre, *pids, *post, EOS]
        )
        assert reg.cat_ids[n][: len(pre) + k + len(post) + 2].tolist() == (
            [BOS, *pre, *c, *post, EOS]
        )
        pad = 0 if sd2_padding else EOS
        assert (reg.obj_ids[n][len(pre) + v + len(post) + 2 :] == pad).all()
        eos_obj, eos_cat = len(pre) + v + len(post) + 1, len(pre) + k + len(post) + 1
        _check_alignment(reg, n, [BOS, *pre, *post, EOS], eos_obj, eos_cat)
        # The concept span itself is never a context slot.
        used_obj = set(reg.obj_index[n][reg.context_mask[n]].tolist())
        used_cat = set(reg.cat_index[n][reg.context_mask[n]].tolist())
        assert used_obj.isdisjoint(range(len(pre) + 1, len(pre) + 1 + v))
        assert used_cat.isdisjoint(range(len(pre) + 1, len(pre) + 1 + k))
        mask, _ = placeholder_slots(reg.obj_ids[n], pids)
        assert mask.sum() == v and not mask[reg.obj_index[n][reg.context_mask[n]]].any()


def test_alignment_gathers_aligned_features(tok):
    # Stand-in encoder outputs that depend on the token alone: after the gather, y* and y_cat
    # must agree on every masked slot.
    add_placeholder_tokens(tok, "<s*>", 3)
    reg = regularization_prompts(
        tok, load_templates("animate")[:10], placeholder_string("<s*>", 3), "teddy bear"
    )
    table = np.random.default_rng(0).normal(size=(49411, 8))
    h_obj, h_cat = table[reg.obj_ids], table[reg.cat_ids]
    g_obj = np.take_along_axis(h_obj, reg.obj_index[..., None], axis=1)
    g_cat = np.take_along_axis(h_cat, reg.cat_index[..., None], axis=1)
    assert g_obj.shape == (10, 77, 8)
    np.testing.assert_array_equal(g_obj[reg.context_mask], g_cat[reg.context_mask])


def test_alignment_word_fused_with_concept(tok):
    # "a {}s": BPE reads "dogs" as one token, so the "s" after the placeholder has no partner.
    add_placeholder_tokens(tok, "<s*>")
    reg = regularization_prompts(tok, "two {}s in a car", "<s*>", "dog")
    expected = [BOS, *tok.encode("two", add_special_tokens=False)]
    expected += [*tok.encode("in a car", add_special_tokens=False), EOS]
    k = int(reg.context_mask[0].sum())
    assert reg.obj_ids[0][reg.obj_index[0][:k]].tolist() == expected
    assert reg.cat_ids[0][reg.cat_index[0][:k]].tolist() == expected


def test_alignment_truncation(tok):
    add_placeholder_tokens(tok, "<s*>")
    template = "a {} in a " + "big " * 80 + "room"
    with pytest.warns(UserWarning, match="truncated to 77"):
        reg = regularization_prompts(tok, template, "<s*>", "teddy bear")
    assert reg.obj_ids[0, -1] == EOS and reg.cat_ids[0, -1] == EOS
    k = int(reg.context_mask[0].sum())
    # y* keeps 71 "big" (positions 5..75), y_cat, one token longer, keeps 70 (6..75).
    big = tok.encode("big", add_special_tokens=False)
    a_, in_ = tok.encode("a in", add_special_tokens=False)
    _check_alignment(reg, 0, [BOS, a_, in_, a_, *big * 70, EOS], 76, 76)
    assert k == 75


def test_alignment_only_category_prompt_truncated(tok):
    add_placeholder_tokens(tok, "<s*>")
    # y* is exactly 77 tokens (fits), y_cat 78: only the latter is cut.
    filler = 77 - 2 - 3  # BOS, EOS, "a", concept, "room"
    template = "a {} " + "big " * filler + "room"
    assert len(tok(template.replace("{}", "<s*>")).input_ids) == 77
    with pytest.warns(UserWarning, match=r"77 \(y\*\) / 78 \(y_cat\)"):
        reg = regularization_prompts(tok, template, "<s*>", "teddy bear")
    big = tok.encode("big", add_special_tokens=False)
    a_ = tok.encode("a", add_special_tokens=False)
    # y_cat lost "room" (and kept every "big"), so "room" is no context slot.
    _check_alignment(reg, 0, [BOS, *a_, *big * filler, EOS], 76, 76)


def test_alignment_errors(tok):
    add_placeholder_tokens(tok, "<s*>")
    with pytest.raises(ValueError, match="exactly one"):
        regularization_prompts(tok, "a {} and a {}", "<s*>", "dog")
    with pytest.raises(ValueError, match="occur 0 times"):
        regularization_prompts(tok, "a {}s", "dog", "cat")  # "dogs" is one token
    with pytest.raises(ValueError, match="occur 2 times"):
        regularization_prompts(tok, "a <s*> and a {}", "<s*>", "dog")
    with pytest.raises(ValueError, match="no tokens"):
        regularization_prompts(tok, "a {}", "<s*>", "")
    with pytest.raises(ValueError, match="beyond the first end-of-text"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        regularization_prompts(tok, "big " * 80 + "{}", "<s*>", "dog")


# ---------------------------------------------------------------- templates


@pytest.mark.parametrize("kind", ["animate", "inanimate"])
def test_builtin_templates(kind, tok):
    templates = load_templates(kind)
    assert 90 <= len(templates) <= 110
    assert len(set(templates)) == len(templates)
    assert all(t.count("{}") == 1 for t in templates)
    add_placeholder_tokens(tok, "<s*>", 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no built-in template may be truncated
        reg = regularization_prompts(tok, templates, placeholder_string("<s*>", 2), "teddy bear")
    assert reg.context_mask.sum(1).min() >= 3


def test_load_templates_from_file(tmp_path):
    good = tmp_path / "mine.txt"
    good.write_text("# my templates\n\na {} on a boat\n  a {} at night  \n")
    assert load_templates(good) == ["a {} on a boat", "a {} at night"]
    assert load_templates(str(good)) == ["a {} on a boat", "a {} at night"]
    bad = tmp_path / "bad.txt"
    bad.write_text("a {} on a boat\na photo\n")
    with pytest.raises(ValueError, match=r"bad.txt:2: .*exactly one"):
        load_templates(bad)
    bad.write_text("a {} with {braces}\n")
    with pytest.raises(ValueError, match="brace"):
        load_templates(bad)
    bad.write_text("# nothing\n\n")
    with pytest.raises(ValueError, match="no templates"):
        load_templates(bad)
    with pytest.raises(FileNotFoundError, match="neither a built-in"):
        load_templates("animals")


def test_cat_concept_span_finds_the_super_category_word(tok):
    """The thesis pairwise's y_cat concept slot: the super-category's tokens, found from the
    aligned context alone, for one- and two-token words at any place in the template."""
    from core_jax.train.passes import cat_concept_span

    add_placeholder_tokens(tok, "<s*>")
    templates = ["a photo of a {} in the snow", "{} at night", "a {}"]
    for word in ("dog", "teddy bear"):
        prompts = regularization_prompts(tok, templates, "<s*>", word)
        span = np.asarray(cat_concept_span(prompts.cat_index, prompts.context_mask))
        word_ids = tok.encode(word, add_special_tokens=False)
        for row in range(len(templates)):
            ids = list(prompts.cat_ids[row])
            start = next(k for k in range(len(ids)) if ids[k:k + len(word_ids)] == word_ids)
            want = np.zeros(len(ids), bool)
            want[start:start + len(word_ids)] = True
            np.testing.assert_array_equal(span[row], want, err_msg=f"{word!r} row {row}")
