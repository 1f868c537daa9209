"""Tokenizer time a streamed answer costs the response thread: the whole answer decoded again for every delta (how
streams were built before triton_vlm.detokenizer) against a few tokens decoded per delta. One delta a token,
tiny llava's tokenizer (real ones cost about as much a token), side by side in one run.

    .venv/bin/python bench/detokenize.py --json bench/results/cpu-detokenize.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from triton_vlm.detokenizer import IncrementalDetokenizer

LENGTHS = (128, 512, 1024, 2048)
TEXT = "The red barn stands beside a café; two dogs run across the field toward 日本 gardens. "


def seconds(run: object, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()  # type: ignore[operator]
        best = min(best, time.perf_counter() - start)
    return best


def measure(lengths: tuple[int, ...] = LENGTHS) -> list[dict[str, float]]:
    from triton_vlm.direct import direct_runtime

    loaded = direct_runtime("llava", tiny=True, device="cpu").ensure_loaded()
    family, processor = loaded.family, loaded.processor
    ids = processor.tokenizer(TEXT * (max(lengths) // 10 + 1), add_special_tokens=False).input_ids

    def decode(token_ids: list[int]) -> str:
        return family.detokenize(processor, token_ids)

    rows = []
    for length in lengths:
        answer = ids[:length]

        def whole() -> None:
            for end in range(1, length + 1):
                decode(answer[:end])

        def incremental() -> None:
            detokenizer = IncrementalDetokenizer(decode)
            for end in range(1, length + 1):
                detokenizer.update(answer[:end])
            assert decode(answer).startswith(detokenizer.text)  # all of it, or all but a cut character

        rows.append({"tokens": length, "whole_s": seconds(whole), "incremental_s": seconds(incremental)})
        rows[-1]["ratio"] = rows[-1]["whole_s"] / rows[-1]["incremental_s"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--lengths", default=",".join(map(str, LENGTHS)), help="answer lengths in tokens")
    args = parser.parse_args()
    rows = measure(tuple(int(n) for n in args.lengths.split(",")))
    print(f"{'tokens':>8} {'whole answer per delta':>24} {'a few tokens per delta':>24} {'ratio':>7}")
    for row in rows:
        print(f"{row['tokens']:>8} {row['whole_s'] * 1e3:>21.1f} ms {row['incremental_s'] * 1e3:>21.1f} ms "
              f"{row['ratio']:>6.0f}x")
    if args.json:
        args.json.write_text(json.dumps({"tokenizer": "tiny llava", "runs": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
