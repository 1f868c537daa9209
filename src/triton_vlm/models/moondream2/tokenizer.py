"""Which tokenizer a moondream2 checkpoint was trained with, and where to get it.

The 2025 releases share one weight layout but come in two tokenizer generations:

* ``starmie`` (2025-06-21, the pinned default): the reference code loads ``moondream/starmie-v1`` from the
  Hugging Face Hub (``Tokenizer.from_pretrained``), whose ids 0..20 are control tokens (``<|endoftext|>`` = 0,
  ``<|md_reserved_0|>`` = 1, ...). The checkpoint repository still ships an older ``tokenizer.json`` that
  these weights do not use.
* ``legacy`` (2025-01-09 .. 2025-04-14): the GPT-2-style tokenizer shipped in the checkpoint repository
  itself, with plain-text templates and ``<|endoftext|>`` = 50256 as BOS and EOS.

The generation is read off the checkpoint's own ``moondream.py`` (it names the tokenizer repository), else off
its ``tokenizer.json`` (only starmie defines ``<|md_reserved_0|>``), else off a dated revision string.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from triton_vlm.errors import ModelLoadError
from triton_vlm.hub import hub_miss_reason
from triton_vlm.models.moondream2.config import TokenizerConfig

STARMIE_REPO = "moondream/starmie-v1"
#: Control tokens of the starmie vocabulary, in id order (0 .. 20).
STARMIE_SPECIAL_TOKENS = ("<|endoftext|>", *(f"<|md_reserved_{i}|>" for i in range(20)))
STARMIE_MARKER = "<|md_reserved_0|>"
FIRST_STARMIE_REVISION = "2025-06-21"


def _legacy_templates() -> dict[str, dict[str, list[int]] | None]:
    # GPT-2 ids of "\n\nQuestion:" / "\n\nAnswer:"-style framing used by the 2025-01-09 .. 2025-04-14 code.
    return {
        "caption": {
            "short": [198, 198, 16438, 8305, 25],
            "normal": [198, 198, 24334, 1159, 25],
            "long": [198, 198, 14617, 8305, 25],
        },
        "query": {"prefix": [198, 198, 24361, 25], "suffix": [198, 198, 33706, 25]},
        "detect": {"prefix": [198, 198, 47504, 25], "suffix": [628]},
        "point": {"prefix": [198, 198, 12727, 25], "suffix": [628]},
    }


@dataclass(frozen=True)
class TokenizerGeneration:
    """Everything that differs between the two tokenizer generations of the 2025 weights."""

    name: str
    #: Hub repository of the tokenizer; None: the checkpoint's own tokenizer.json.
    repo: str | None
    defaults: TokenizerConfig
    #: The legacy code put a space before the question; the starmie code does not.
    question_prefix: str
    #: The starmie code ends a question with the query suffix and then, when not reasoning, feeds the suffix
    #: once more as the answer marker; the legacy code has one suffix.
    query_suffix_twice: bool
    #: ``TokenizerConfig`` fields naming tokens masked out of every decode step after the first (the starmie
    #: answer marker).
    suppressed_in_decode: tuple[str, ...]


STARMIE = TokenizerGeneration(name="starmie", repo=STARMIE_REPO, defaults=TokenizerConfig(), question_prefix="",
                              query_suffix_twice=True, suppressed_in_decode=("answer_id",))
LEGACY = TokenizerGeneration(
    name="legacy", repo=None, question_prefix=" ", query_suffix_twice=False, suppressed_in_decode=(),
    defaults=TokenizerConfig(bos_id=50256, eos_id=50256, answer_id=None, thinking_id=None, coord_id=None,
                             size_id=None, start_ground_points_id=None, end_ground_id=None,
                             templates=_legacy_templates()),
)


def detect_generation(checkpoint: Path, revision: str | None = None) -> TokenizerGeneration:
    """The tokenizer generation of the checkpoint in directory ``checkpoint``."""
    code = checkpoint / "moondream.py"
    if code.is_file():
        return STARMIE if STARMIE_REPO in code.read_text(errors="replace") else LEGACY
    if _is_starmie_file(checkpoint / "tokenizer.json"):
        return STARMIE
    # ISO dates order as strings; anything else ("main", a commit hash) means the current release.
    if revision and len(revision) == 10 and revision[:4].isdigit() and revision < FIRST_STARMIE_REVISION:
        return LEGACY
    return STARMIE


def _is_starmie_file(path: Path) -> bool:
    try:
        return path.is_file() and STARMIE_MARKER in path.read_text(errors="replace")
    except OSError:
        return False


class Moondream2Tokenizer:
    """A thin wrapper over ``tokenizers.Tokenizer`` with the calls the reference makes (encode / decode,
    both with the library's defaults)."""

    def __init__(self, tokenizer: Tokenizer, eos_id: int) -> None:
        self._tokenizer = tokenizer
        self.eos_token_id = eos_id
        # Pads are masked out; the EOS id keeps them inside the vocabulary.
        self.pad_token_id = eos_id

    @classmethod
    def from_file(cls, path: Path, eos_id: int) -> Moondream2Tokenizer:
        return cls(Tokenizer.from_file(str(path)), eos_id)

    def encode(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text).ids)

    def decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids)

    def token_to_id(self, token: str) -> int | None:
        return self._tokenizer.token_to_id(token)

    def __len__(self) -> int:
        return self._tokenizer.get_vocab_size()


def load_tokenizer(checkpoint: Path, generation: TokenizerGeneration, defaults: TokenizerConfig, *,
                   model_id: str, local_files_only: bool) -> Moondream2Tokenizer:
    """The tokenizer the weights in ``checkpoint`` were trained with.

    A starmie ``tokenizer.json`` inside the checkpoint directory wins (tiny checkpoints have one; for real
    weights offline, copy starmie's file over the stale one there). Otherwise starmie comes from the Hub cache
    (downloaded unless ``local_files_only``); the legacy tokenizer is the checkpoint's own file.
    """
    local = checkpoint / "tokenizer.json"
    if generation is STARMIE and not _is_starmie_file(local):
        local = _starmie_from_hub(model_id, local_files_only, checkpoint)
    elif not local.is_file():
        raise ModelLoadError(
            f"model {model_id!r}: no tokenizer.json in {str(checkpoint)!r}; the {generation.name} tokenizer ships "
            "with the checkpoint, so download the whole checkpoint revision again")
    try:
        return Moondream2Tokenizer.from_file(local, defaults.eos_id)
    except Exception as exc:
        raise ModelLoadError(f"model {model_id!r}: cannot read tokenizer {str(local)!r}: {exc}") from exc


def _starmie_from_hub(model_id: str, local_files_only: bool, checkpoint: Path) -> Path:
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(STARMIE_REPO, "tokenizer.json", local_files_only=local_files_only))
    except Exception as exc:
        raise ModelLoadError(
            f"model {model_id!r}: its weights need the tokenizer {STARMIE_REPO!r} (the reference code loads it), "
            f"but {hub_miss_reason()}. Provide it by one of: (1) on a connected machine run `hf download "
            f"{STARMIE_REPO} tokenizer.json` and copy the Hugging Face cache to this host's HF_HOME; (2) copy that "
            f"tokenizer.json into {str(checkpoint)!r} (replacing the unused older one). "
            f"Cause: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        ) from exc


def starmie_template_ids(tokenizer: Moondream2Tokenizer) -> TokenizerConfig:
    """Starmie-style templates for a *tiny* tokenizer: the same control tokens around the task words as the
    real ones, with the words tokenized by the tiny vocabulary."""
    def words(text: str) -> list[int]:
        return tokenizer.encode(text)

    def framed(task: str, *, tail: list[int] | None = None) -> list[int]:
        return [1, *words(task), 2, *(tail or [])]

    templates: dict[str, dict[str, list[int]] | None] = {
        "caption": {length: framed("describe", tail=[*words(length), 3]) for length in ("short", "normal", "long")},
        "query": {"prefix": framed("query"), "suffix": [3]},
        "detect": {"prefix": framed("detect"), "suffix": [3]},
        "point": {"prefix": framed("point"), "suffix": [3]},
    }
    return TokenizerConfig(templates=templates)


def train_tiny_tokenizer(path: Path) -> None:
    """Write a tiny byte-level BPE ``tokenizer.json`` with starmie's control tokens at ids 0..20."""
    from triton_vlm.tiny import train_byte_level_bpe

    tokenizer = train_byte_level_bpe(
        vocab_size=640, specials=list(STARMIE_SPECIAL_TOKENS),
        extra_corpus=["query describe short normal long detect point", "a face, a person, an ear, a hand"],
    )
    tokenizer.save(str(path))
    saved = json.loads(path.read_text())
    ids = {t["content"]: t["id"] for t in saved.get("added_tokens", [])}
    if [ids.get(t) for t in STARMIE_SPECIAL_TOKENS] != list(range(len(STARMIE_SPECIAL_TOKENS))):
        raise RuntimeError("tiny moondream2 tokenizer: control tokens did not land on ids 0..20")
