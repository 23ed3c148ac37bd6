"""Accepts a row (JSON on stdin) when its last `ANSWER: n` line equals a + b."""
import json
import re
import sys

row = json.load(sys.stdin)
a = int(row["variables"]["a"])
b = int(row["variables"]["b"])
found = re.findall(r"ANSWER:\s*(-?\d+)", row["text"])
sys.exit(0 if found and int(found[-1]) == a + b else 1)
