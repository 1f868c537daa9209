"""GPU probe: the engine's greedy tokens against HF ``generate`` for llava-1.5-7b (random fp16 weights), and where
they part, how close HF's own logits had the two choices (random weights put near-ties everywhere, so the
question is whether each parting is one).

python -m bench.gpu_parity_probe [--requests 4] [--max-tokens 64] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import statistics

import numpy as np
import torch
from PIL import Image

from triton_vlm.bench.checkpoints import random_llava_7b
from triton_vlm.bench.parity import divergence, hf_greedy_with_logits
from triton_vlm.engine import EngineConfig, LLMEngine
from triton_vlm.models import get_family
from triton_vlm.sampling import SamplingParams

PROMPT = "Describe this image in detail, including the colors, objects and their positions."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--json")
    args = parser.parse_args()
    family = get_family("llava")
    model, processor = random_llava_7b(torch.device("cuda"))
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (336, 336, 3), dtype=np.uint8)) for _ in range(args.requests)]
    engine = LLMEngine(family, model, processor, EngineConfig(max_model_len=768, max_num_seqs=args.requests))
    params = SamplingParams(max_tokens=args.max_tokens)
    ours = engine.generate([(image, PROMPT, params) for image in images])
    rows = []
    for image, tokens in zip(images, ours):
        theirs, logits = hf_greedy_with_logits(family, model, processor, image, PROMPT, args.max_tokens)
        found = divergence(tokens, theirs, logits)
        # For scale: how far apart HF's top two logits usually are, and the float16 step at their size.
        top2 = [row.topk(2).values for row in logits[:found.length]]
        rows.append({"first_differing_token": found.step, "tokens_equal": found.length - (found.step is not None),
                     "gap_at_parting": found.gap,
                     "median_top2_gap": statistics.median(float(t[0] - t[1]) for t in top2),
                     "fp16_step_at_top_logit": float(torch.finfo(torch.float16).eps * 2 ** np.floor(
                         np.log2(max(abs(float(t[0])) for t in top2))))})
        print(json.dumps(rows[-1]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "max_tokens": args.max_tokens, "requests": rows}, f,
                      indent=1)


if __name__ == "__main__":
    main()
