"""moondream2 (``vikhyatk/moondream2``, 2025 releases), implemented natively: no ``trust_remote_code``.

Modules, one job each: :mod:`.config` (sizes), :mod:`.image` (crops), :mod:`.vision` / :mod:`.text` /
:mod:`.region` / :mod:`.model` (the network), :mod:`.weights` (official key names, loading), :mod:`.tokenizer`
(which tokenizer, from where), :mod:`.tasks` / :mod:`.processor` / :mod:`.locate` (skills and prompts), and
:mod:`.family` (the adapter the runtime uses); on triton-vlm's engine, :mod:`.engine_adapter` (the query task,
image features into the prefix slots) and :mod:`.engine_decoder` (the text decoder over the slot KV cache).
"""

from triton_vlm.models.moondream2.family import DEFAULT_REVISION, Moondream2Family

__all__ = ["DEFAULT_REVISION", "Moondream2Family"]
