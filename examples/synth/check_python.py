"""Accepts a row (JSON on stdin) whose ```python block defines a function and at least three
asserts, all of which pass when the block runs in a fresh interpreter within 10 seconds."""
import json
import re
import subprocess
import sys

row = json.load(sys.stdin)
blocks = re.findall(r"```python\n(.*?)```", row["text"], re.S)
if not blocks:
    sys.exit(1)
code = blocks[0]
if "def " not in code or code.count("assert ") < 3:
    sys.exit(1)
try:
    run = subprocess.run(
        [sys.executable, "-I", "-c", code],
        capture_output=True,
        timeout=10,
        stdin=subprocess.DEVNULL,
    )
except subprocess.TimeoutExpired:
    sys.exit(1)
sys.exit(run.returncode)
