import os
import subprocess
import sys

import pytest

SCRIPT = "import os, hybridlm; print(os.environ['THP_MEM_ALLOC_ENABLE'])"


@pytest.mark.parametrize("preset, expected", [(None, "1"), ("0", "0")])
def test_importing_hybridlm_asks_pytorch_for_huge_pages_unless_the_user_chose(preset, expected):
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if preset is not None:
        env["THP_MEM_ALLOC_ENABLE"] = preset
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == expected
