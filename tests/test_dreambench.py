"""`core_jax.eval.dreambench.read_protocol` on google/dreambooth's protocol file.

tests/fixtures/dreambench_prompts_and_classes.txt is `dataset/prompts_and_classes.txt` of
github.com/google/dreambooth (commit e9b8c01, CC-BY-4.0), byte for byte (4,039 characters).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from core_jax.errors import InputError
from core_jax.eval.dreambench import fill, read_protocol

REAL = Path(__file__).parent / "fixtures" / "dreambench_prompts_and_classes.txt"


def test_reads_the_real_file():
    protocol = read_protocol(REAL)
    assert len(protocol.classes) == 30
    assert protocol.classes["bear_plushie"] == "stuffed animal"
    assert protocol.classes["dog8"] == "dog" and protocol.classes["pink_sunglasses"] == "glasses"
    assert list(protocol.classes)[:2] == ["backpack", "backpack_dog"]  # the file's order
    assert len(protocol.object_prompts) == len(protocol.live_prompts) == 25
    assert protocol.object_prompts[0] == "a {0} {1} in the jungle"
    assert protocol.object_prompts[-1] == protocol.live_prompts[-1] == "a cube shaped {0} {1}"
    assert protocol.live_prompts[13] == "a {0} {1} wearing a black top hat and a monocle"
    live = sorted(s for s in protocol.classes if protocol.is_live(s))
    assert live == ["cat", "cat2", "dog", "dog2", "dog3", "dog5", "dog6", "dog7", "dog8"]
    assert protocol.prompts("dog2") == protocol.live_prompts
    assert protocol.prompts("teapot") == protocol.object_prompts
    assert fill(protocol.object_prompts[20], "sks", "teapot") == "a red sks teapot"


def _write(tmp_path, text: str) -> Path:
    path = tmp_path / "prompts_and_classes.txt"
    path.write_text(text)
    return path


def _variant(old: str, new: str) -> str:
    text = REAL.read_text()
    assert old in text
    return text.replace(old, new, 1)


@pytest.mark.parametrize(("old", "new", "message"), [
    ("subject_name,class", "subject,class", "no 'subject_name,class' table header"),
    ("dog5,dog", "dog5 dog", "line 17: expected 'subject,class'"),
    ("Live Subject Prompts", "Live Prompts", "no 'Live Subject Prompts' heading"),
    ("'a wet {0} {1}'.format(unique_token, class_token)",
     "__import__('os').system('true')", "a prompt must be a string"),
    ("'a red {0} {1}'.format(unique_token, class_token)",
     "'a red {0} {1}'.format(class_token, unique_token)", "a prompt must be a string"),
    ("'a red {0} {1}'", "'a red {1}'", "has no {0} for the unique token"),
    ("in the snow'.format", "in the snow.format", "is not a Python list"),
])
def test_malformed_files_are_one_clear_error_and_never_run(tmp_path, old, new, message):
    with pytest.raises(InputError, match=re.escape(message)):
        read_protocol(_write(tmp_path, _variant(old, new)))


def test_a_missing_file_is_one_clear_error(tmp_path):
    with pytest.raises(InputError, match="cannot read the DreamBench protocol"):
        read_protocol(tmp_path / "nope.txt")
