import pytest

from purecc_jax.data import texts


def test_derive_texts():
    t = texts.derive("a photo of sks dog on the beach", "sks", "dog")
    assert t == texts.Texts("a photo of sks dog on the beach", "a photo of dog on the beach", "sks dog", "")
    assert texts.from_template("zwx", "toy").complete == "a photo of zwx toy"
    assert texts.remove_identifier("sks, sks dog", "sks") == "sks, dog"  # only whole words


def test_identifier_must_be_present(tmp_path):
    with pytest.raises(ValueError, match="does not contain the identifier 'sks'"):
        texts.derive("a photo of a dog", "sks", "dog")
    with pytest.raises(ValueError, match="one non-empty word"):
        texts.derive("a photo", "two words", "dog")


def test_caption_file(tmp_path):
    f = tmp_path / "00.txt"
    f.write_text("a sks dog in snow\nbase: a dog in the snow\ntarget: sks puppy\n")
    assert texts.read_caption_file(f, "sks", "dog") == texts.Texts("a sks dog in snow", "a dog in the snow", "sks puppy")
    f.write_text("a sks dog\nstyle: oil\n")
    with pytest.raises(ValueError, match="00.txt: unexpected line"):
        texts.read_caption_file(f, "sks", "dog")
    f.write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        texts.read_caption_file(f, "sks", "dog")


def test_identifier_rules():
    for identifier, class_word in (("dog", "dog"), ("Dog", "dog"), ("bear", "teddy bear")):
        with pytest.raises(ValueError, match=f"identifier {identifier!r} is a word of the class word"):
            texts.check_identifier(identifier, class_word)
    texts.check_identifier("sks", "sks-like dog")  # a word of its own, not a word of the class
    for bad in ("", " sks", "sks dog", "sks\tdog"):
        with pytest.raises(ValueError, match="one non-empty word without spaces"):
            texts.check_identifier(bad, "dog")
    with pytest.raises(ValueError, match="is a word of the class word 'toy robot'"):
        texts.derive("a photo of robot toy robot", "robot", "toy robot")


def test_words_containing_the_identifier():
    assert texts.words_containing("a sks dog wearing masks near SKS-desks", "sks") == ["masks", "desks"]
    assert texts.words_containing("a photo of sks dog", "sks") == []
    assert texts.words_containing("sks_dog", "sks") == ["sks_dog"]
