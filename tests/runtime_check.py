"""Check in a fresh process that loading an artifact and generating imports no torch, frontend or passes."""

import subprocess
import sys


def assert_generates_without_torch(path: str) -> None:
    code = (
        "import sys, kiln\n"
        f"eng = kiln.load({str(path)!r})\n"
        "res = eng.generate([1, 2, 3], max_new_tokens=3, ignore_eos=True)\n"
        "bad = [m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'kiln.frontend', 'kiln.passes'))]\n"
        "assert not bad, bad\n"
        "print(len(res.token_ids))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "3"
