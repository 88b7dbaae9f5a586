"""`make demo`: train the demo preset, evaluate it on the test split, generate a continuation.

Every step is the public CLI, so this script doubles as a worked example of it.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

from spadeformer.cli import evaluate, generate_text, train

RUN = Path("runs/demo")
PROMPT = "import os\nimport sys\n\n\ndef main(argv):\n    for name in "


def main() -> int:
    if RUN.exists():  # the demo always starts fresh
        shutil.rmtree(RUN)
    t0 = time.time()
    print(f"[1/3] training configs/demo.yaml into {RUN}/ ...", flush=True)
    train("configs/demo.yaml", [], out=str(RUN))
    print(f"      done in {time.time() - t0:.0f} s", flush=True)

    print("[2/3] evaluating on the held-out test split ...", flush=True)
    metrics = evaluate(str(RUN), split="test")
    print(json.dumps(metrics, indent=2))
    print(f"      SPADE: {metrics['bpb']:.3f} bits/byte   unigram baseline: "
          f"{metrics['unigram_bpb']:.3f} bits/byte", flush=True)

    print(f"[3/3] generating a continuation of {PROMPT!r}:\n", flush=True)
    sys.stdout.write(PROMPT)
    # temperature < 0.9 tends to get stuck in long runs of spaces (indentation) with a
    # model this small
    generate_text(str(RUN), PROMPT, max_new_tokens=300, temperature=0.9, top_p=0.95, seed=0,
                  stream=sys.stdout)
    print(f"\nrun directory: {RUN}/ (metrics.jsonl, curves.png, model/, checkpoints/); "
          f"total {time.time() - t0:.0f} s")
    return 0 if metrics["bpb"] < metrics["unigram_bpb"] else 1


if __name__ == "__main__":
    sys.exit(main())
