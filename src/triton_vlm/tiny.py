"""Tiny random-weight checkpoints of the real architectures, built locally (no hub needed).

Each family's ``build_tiny`` writes a checkpoint in the same file layout as its real one, so the serving code
loads it through exactly the path real weights take. Builds are deterministic (seeded): every process that
builds or loads ``<root>/<family>`` gets the same weights, which is what served-vs-direct parity relies on.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

#: Bump when a tiny builder changes, so stale checkpoints in caches are rebuilt.
#: 2: the kosmos2 unigram vocabulary is canonical (rounded scores, sorted), so its tokenizer.json is reproducible.
#: 3: the tiny Idefics3 (smolvlm; auto's stand-in) has tied embeddings, SmolVLM's rope_theta and std-0.2 weights.
#: 4: llava's chat template is llava-hf's (system text without a role, a message's images before its text);
#:    llava_next's is llava-v1.6-mistral's (system block, earlier answers closed by "</s>").
TINY_FORMAT_VERSION = 4
#: Decimal places kept of a trained unigram log-probability (the trainer's last bits vary from run to run).
UNIGRAM_SCORE_DECIMALS = 6
SEED = 1234

log = logging.getLogger("triton_vlm")

CORPUS = [
    "a photo of a cat sitting on a red mat next to a window",
    "what is in this image? describe the picture in detail.",
    "the quick brown fox jumps over the lazy dog in the green field",
    "an image of a snowman warming himself by a fire",
    "two people riding bicycles down a busy city street at night",
    "a bowl of fruit with apples, bananas and oranges on a wooden table",
    "How many objects are there? Answer with one word.",
    "USER: ASSISTANT: yes no red blue green yellow black white left right top bottom",
    "0 1 2 3 4 5 6 7 8 9 10 100 1000",
]


def tiny_root() -> Path:
    """Where tiny checkpoints live: ``$TRITON_VLM_CACHE/tiny`` or ``~/.cache/triton-vlm/tiny``."""
    base = os.environ.get("TRITON_VLM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "triton-vlm"
    )
    return Path(base) / "tiny"


def tiny_checkpoint_dir(family: str, root: Path | None = None, variant: str | None = None) -> Path:
    name = f"{family}-{variant}" if variant else family
    return (root or tiny_root()) / f"{name}-v{TINY_FORMAT_VERSION}"


def ensure_tiny_checkpoint(family: str, root: Path | None = None, variant: str | None = None) -> Path:
    """Build the tiny checkpoint of ``family`` unless it exists; safe when processes race for it.

    ``variant``: for families of several architectures (``auto``), which one (see ``ModelFamily.tiny_variant``);
    by default the one standing in for the family's default weights.
    """
    from triton_vlm.models import get_family

    if variant is None:
        adapter = get_family(family)
        variant = adapter.tiny_variant(adapter.default_hf_model_id)
    target = tiny_checkpoint_dir(family, root, variant)
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f".{target.name}.lock"):
        if (target / "config.json").exists():
            return target
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        started = time.monotonic()
        try:
            builder = get_family(family)
            builder.build_tiny(staging, variant=variant)
            staging.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        # Said once per build: a cache that survives (a container's volume) shows no such line on the next start.
        log.info("built the tiny checkpoint %s in %.1f s", target, time.monotonic() - started)
    return target


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def seeded() -> None:
    import torch

    torch.manual_seed(SEED)


@contextmanager
def built_as(dtype: Any = None, device: Any = None) -> Iterator[None]:
    """Modules created inside get parameters of ``dtype`` (default: unchanged) on ``device`` (default: CPU):
    a full-size random model is built where it runs, with no float32 copy on the CPU first."""
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype or previous)
    try:
        with torch.device(device or "cpu"):
            yield
    finally:
        torch.set_default_dtype(previous)


def speak_within(model: Any, tokenizer: Any) -> None:
    """Zero ``model``'s output rows of the ids past ``tokenizer``'s vocabulary (a small tokenizer under a full-size
    vocabulary): random weights then choose ids that decode to text, so a benchmark's streamed answer arrives piece
    by piece as a real model's does, not as one piece at the end (ids the tokenizer lacks decode to nothing, and an
    empty piece is never sent). Costs nothing in speed: the shapes stay."""
    import torch

    with torch.no_grad():
        model.get_output_embeddings().weight[len(tokenizer):] = 0


#: Spread of the random q/k/v biases of Qwen2 decoders (transformers starts them at zero; trained ones are far from
#: it, and a zero bias would let a decoder that drops them pass every parity test).
QKV_BIAS_STD = 0.1


def randomize_qkv_biases(layers: Any) -> None:
    """Draw the q/k/v projection biases of decoder ``layers`` (Qwen2's) from N(0, :data:`QKV_BIAS_STD`)."""
    import torch

    for layer in layers:
        attention = layer.self_attn
        for projection in (attention.q_proj, attention.k_proj, attention.v_proj):
            torch.nn.init.normal_(projection.bias, std=QKV_BIAS_STD)


def train_llama_style_vocab(vocab_size: int, pad_to: int | None = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A SentencePiece-like BPE (metaspace, byte fallback) vocabulary and merges, trained on :data:`CORPUS`.

    ``pad_to`` appends filler pieces up to that size, so ids line up with a full-size model (32000 for Llama-2).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    specials = ["<unk>", "<s>", "</s>"]
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials + byte_tokens, show_progress=False)
    tokenizer.train_from_iterator(CORPUS, trainer)
    state = json.loads(tokenizer.to_str())["model"]
    merges: list[tuple[str, str]] = []
    for merge in state["merges"]:  # "a b" in older tokenizers' JSON, ["a", "b"] in newer
        first, second = merge.split(" ", 1) if isinstance(merge, str) else merge
        merges.append((first, second))
    vocab = dict(state["vocab"])
    for index in range(len(vocab), pad_to or 0):
        vocab[f"▁filler{index}"] = index  # decodable, never produced by encoding (no merge reaches it)
    return vocab, merges


def train_byte_level_bpe(vocab_size: int, specials: list[str], extra_corpus: list[str] | None = None) -> Any:
    """A GPT-2-style byte-level BPE ``tokenizers.Tokenizer``, ``specials`` first (ids 0..), trained on
    :data:`CORPUS` plus ``extra_corpus``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS + list(extra_corpus or []), trainer)
    return tokenizer


def train_qwen2_tokenizer(specials: list[str], extra_corpus: list[str]) -> Any:
    """A Qwen2 tokenizer (byte-level BPE) trained on :data:`CORPUS` plus ``extra_corpus``, ``specials`` first (ids
    0..): the first is the padding (``<|endoftext|>``), the others special tokens; ``<|im_end|>`` ends a turn."""
    from transformers import Qwen2Tokenizer

    trained = json.loads(train_byte_level_bpe(500, specials, extra_corpus).to_str())
    # Pairs, as tokenizers' BPE takes them ("a b" in older tokenizers' JSON, ["a", "b"] in newer).
    merges: Any = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in trained["model"]["merges"]]
    tokenizer = Qwen2Tokenizer(vocab=trained["model"]["vocab"], merges=merges, eos_token="<|im_end|>",
                               pad_token=specials[0])
    tokenizer.add_special_tokens({"additional_special_tokens": specials[1:]})
    return tokenizer


def train_unigram_vocab(vocab_size: int, specials: list[str]) -> list[tuple[str, float]]:
    """A SentencePiece-like unigram vocabulary (token, log-prob) with ``specials`` first, as XLM-R has.

    Deterministic: tokenizers' UnigramTrainer returns its pieces in a different order on every run (hash-map
    order), with scores that differ in the last bits (summation order), and it gives the required characters
    the model lacks the scores ``min + k * 1e-4`` in hash-map order too. So the trained pieces are made
    canonical: scores rounded to :data:`UNIGRAM_SCORE_DECIMALS` places; those ``min + k * 1e-4`` scores handed
    to the single characters at the bottom in sorted character order; then everything sorted by
    ``(-score, token)`` after the specials (which keep their given order and ids).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.Unigram())
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=specials, unk_token="<unk>", show_progress=False,
        initial_alphabet=list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,?!:'-"),
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    trained = json.loads(tokenizer.to_str())["model"]["vocab"]
    special_set = set(specials)
    head = {token: float(score) for token, score in trained if token in special_set}
    scores = {token: round(float(score), UNIGRAM_SCORE_DECIMALS) for token, score in trained
              if token not in special_set}
    # The trainer's filler scores for required characters: floor, floor + 1e-4, ... (one per character).
    floor = min(scores.values())
    singles = [token for token in scores if len(token) == 1]
    band = sorted(token for token in singles if scores[token] < floor + 1e-4 * (len(singles) + 1))
    for token, score in zip(band, sorted((scores[t] for t in band), reverse=True), strict=True):
        scores[token] = score
    pieces = sorted(scores.items(), key=lambda item: (-item[1], item[0]))
    return [(token, head.get(token, 0.0)) for token in specials] + pieces
