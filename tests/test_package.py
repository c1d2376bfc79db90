"""What a user imports from the top of the package."""
import subprocess
import sys

import qwenvl


def test_top_level_names():
    from qwenvl import QwenVL, QwenVLTokenizer, chat, chat_stream, patch_official_model  # noqa: F401
    from qwenvl.generation import chat as chat_fn
    from qwenvl.official import patch_official_model as patch_fn

    assert chat is chat_fn and patch_official_model is patch_fn
    assert set(qwenvl.__all__) <= set(dir(qwenvl))
    for name in qwenvl.__all__:
        assert getattr(qwenvl, name) is not None


def test_unknown_name_is_an_attribute_error():
    try:
        qwenvl.no_such_thing
    except AttributeError as e:
        assert "no_such_thing" in str(e)
    else:
        raise AssertionError("qwenvl.no_such_thing did not raise")


def test_import_does_not_pull_transformers():
    # the official patch's transformers check runs only when the patch is used
    code = "import sys, qwenvl; qwenvl.patch_official_model; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
