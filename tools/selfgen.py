"""Write self-generated calibration text to a file: the model samples text from its BOS token.

The sampling lives in selfgen_utils.py (acur.py's `--calib_dataset selfgen` uses it directly); this CLI
writes the text for `--calib_dataset text:PATH`:

    python tools/selfgen.py --model_id smollm2-135m --n_samples 8 --seqlen 512 --out selfgen.txt
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import acur  # noqa: E402
from selfgen_utils import generate_text  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model_id", required=True, help="HF id, local dir or offline alias (as acur.py)")
    p.add_argument("--n_samples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--seed", type=int, default=233)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--out", required=True, help="text file to write (use with --calib_dataset text:PATH)")
    a = p.parse_args(argv)
    margs = acur.build_parser().parse_args(["--model_id", a.model_id, "--raw_model", "--calib_seqlen",
                                            str(a.seqlen), "--eval_seqlen", str(a.seqlen)])
    try:
        model, tokenizer, _ = acur.load_model(margs)
    except acur.UsageError as exc:
        print(f"selfgen.py: error: {exc}", file=sys.stderr)
        return 2
    text = generate_text(model, tokenizer, a.n_samples, a.seqlen, a.seed, a.batch_size)
    Path(a.out).write_text(text, encoding="utf-8")
    print(f"wrote {len(text)} characters to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
