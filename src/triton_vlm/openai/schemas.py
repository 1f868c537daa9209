"""Request and response bodies of the OpenAI-compatible API (the subset triton-vlm serves), as pydantic models.

They are the API's OpenAPI description too (``/openapi.json``). Unknown request fields are ignored, as most
OpenAI-compatible servers do; known fields this server cannot honour are refused with a 400 (see
:func:`triton_vlm.openai.app.unsupported_parameters`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.config import JsonDict

INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


# -- request ---------------------------------------------------------------------------------------------
class ImageURL(_Request):
    url: str = Field(description="A data URI (`data:image/png;base64,...`), or an `http(s)://` URL when the server "
                                 "runs with --allow-remote-images.")
    detail: Literal["auto", "low", "high"] | None = Field(default=None, description="Accepted and ignored.")


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ImagePart(_Request):
    type: Literal["image_url"]
    image_url: ImageURL


class RefusalPart(_Request):
    type: Literal["refusal"]
    refusal: str


UserContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]
AssistantContentPart = Annotated[TextPart | RefusalPart, Field(discriminator="type")]


class SystemMessage(_Request):
    """Instructions: a system turn of the model's chat template (developer is its newer name)."""

    role: Literal["system", "developer"]
    content: str | list[TextPart]
    name: str | None = None


class UserMessage(_Request):
    role: Literal["user"]
    content: str | list[UserContentPart]
    name: str | None = None


class AssistantMessage(_Request):
    """An earlier answer (multi-turn); tool calls are not supported."""

    role: Literal["assistant"]
    content: str | list[AssistantContentPart] | None = None
    refusal: str | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = Field(default=None, description="Not supported: must be empty.")


class ToolMessage(_Request):
    """Not supported (these models call no tools): refused with a 400."""

    role: Literal["tool"]
    content: str | list[TextPart]
    tool_call_id: str


Message = Annotated[SystemMessage | UserMessage | AssistantMessage | ToolMessage, Field(discriminator="role")]


class StreamOptions(_Request):
    include_usage: bool | None = Field(default=None, description="Send a last chunk with the token usage.")


#: A 16x16 red PNG, for the description's example request.
EXAMPLE_IMAGE = ("data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAABAAAAAQCAIAAACQkWg2AAAAGklEQVR42mM8oaHBQ"
                 "ApgYiARjGoY1TB0NAAAjC0BOJDndDkAAAAASUVORK5CYII=")
EXAMPLE_REQUEST: JsonDict = {
    "model": "llava",
    "messages": [{"role": "user", "content": [{"type": "text", "text": "What colour is this image?"},
                                              {"type": "image_url", "image_url": {"url": EXAMPLE_IMAGE}}]}],
    "max_completion_tokens": 16,
}


class ChatCompletionRequest(_Request):
    """``POST /v1/chat/completions``. The last message must be the user's; images as many as the model takes (none:
    a text-only chat)."""

    model_config = ConfigDict(extra="ignore", json_schema_extra={"examples": [EXAMPLE_REQUEST]})

    model: str = Field(description="A model from GET /v1/models, e.g. llava, kosmos2, moondream2.")
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(
        default=None, ge=1, le=INT32_MAX, description="Most tokens to generate (the model's limit applies, 1024 by "
                                                      "default; over it is a 400). Wins over max_tokens.")
    max_tokens: int | None = Field(default=None, ge=1, le=INT32_MAX,
                                   description="Older name of max_completion_tokens.")
    temperature: float | None = Field(default=None, ge=0, le=2, allow_inf_nan=False,
                                      description="0 (and the default when omitted) is greedy decoding.")
    top_p: float | None = Field(default=None, ge=0, le=1, allow_inf_nan=False,
                                description="Nucleus sampling; 0 means greedy.")
    seed: int | None = Field(default=None, ge=0, le=INT64_MAX,
                             description="Seeds sampling: the same seed gives the same answer.")
    stream: bool | None = Field(default=False, description="Answer with server-sent events "
                                                           "(chat.completion.chunk objects, then `data: [DONE]`).")
    stream_options: StreamOptions | None = None
    n: int | None = Field(default=None, ge=1, le=8, description="Choices from one prompt (one prefill); with a seed, "
                                                                "choice i draws with seed + i. Streamed, the "
                                                                "choices' chunks come interleaved, each with its "
                                                                "index.")
    stop: str | list[str] | None = Field(default=None, description="Up to 4 strings: the answer ends right before "
                                                                   "the first (finish_reason stop).")
    presence_penalty: float | None = Field(default=None, ge=-2, le=2, allow_inf_nan=False,
                                           description="Lowers the logits of tokens already generated.")
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2, allow_inf_nan=False,
                                            description="Lowers the logits of tokens by how often they were generated.")
    repetition_penalty: float | None = Field(default=None, gt=0, le=10, allow_inf_nan=False,
                                             description="triton-vlm extension (HF's, as vLLM's): divides the "
                                                         "positive logits of prompt and generated tokens by it.")
    logprobs: bool | None = Field(default=None, description="Each generated token's logprob (choices[].logprobs).")
    top_logprobs: int | None = Field(default=None, ge=0, le=20,
                                     description="The most likely alternatives per token (needs logprobs).")
    logit_bias: dict[str, float] | None = Field(default=None, description="Not supported: must be null or empty.")
    tools: list[dict[str, Any]] | None = Field(default=None, description="Not supported: must be null or empty.")
    response_format: dict[str, Any] | None = Field(
        default=None, description='{"type": "text"}, {"type": "json_object"}, or {"type": "json_schema", '
                                  '"json_schema": {"name": ..., "schema": {...}, "strict": true}}: the answer is JSON '
                                  "that follows the schema (a grammar masks every token). moondream2 refuses it.")
    user: str | None = Field(default=None, description="Accepted and ignored.")
    task: str | None = Field(default=None, description="triton-vlm extension: a skill of models that have several "
                                                       "(moondream2: query, caption[:short|normal|long], detect, "
                                                       "point). Send it with the openai client's extra_body.")


# -- responses -------------------------------------------------------------------------------------------
FinishReason = Literal["stop", "length"]


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(description="Prompt tokens taken from the engine's prefix cache (not prefilled "
                                           "again); 0 where the model has no engine.")


class Usage(BaseModel):
    prompt_tokens: int = Field(description="Tokens of the prompt as the model saw it (image tokens included).")
    completion_tokens: int = Field(description="Generated tokens, of all the choices together.")
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class Box(BaseModel):
    x_min: float
    y_min: float
    x_max: float
    y_max: float


class GroundedEntity(BaseModel):
    """A phrase of the answer and where it is in the image (kosmos2's ``entities`` output)."""

    phrase: str
    span: list[int] | None = Field(description="[start, end) character offsets of the phrase in the answer; "
                                               "zero width for an object the answer does not name.")
    boxes: list[Box] = Field(description="Normalized to 0..1 of the image's width and height.")
    boxes_px: list[Box] = Field(description="The same boxes in pixels of the original image.")


ENTITIES_DESCRIPTION = ("triton-vlm extension: the phrases of a grounded answer with their boxes, from models that "
                        "have an `entities` output (kosmos2; `<grounding>` prompts); null for other models.")


class AssistantAnswer(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: None = None
    entities: list[GroundedEntity] | None = Field(default=None, description=ENTITIES_DESCRIPTION)


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None
    token_id: int = Field(description="triton-vlm extension: the token's id in the model's tokenizer.")


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None
    refusal: None = None


class Choice(BaseModel):
    index: int
    message: AssistantAnswer
    finish_reason: FinishReason
    logprobs: ChoiceLogprobs | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    system_fingerprint: str | None = None


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    entities: list[GroundedEntity] | None = Field(default=None, description=ENTITIES_DESCRIPTION + " Streamed: "
                                                  "only on the chunk with the finish_reason.")


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    finish_reason: FinishReason | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a streamed answer (``data: {...}``)."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


Capability = Literal["stream", "task", "entities"]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "triton-vlm"
    capabilities: list[Capability] = Field(
        default_factory=list, description="triton-vlm extension: `stream` (token by token), `task` (takes the task "
                                          "field), `entities` (grounded answers carry message.entities).")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    triton: str | None = Field(default=None, description="Triton's gRPC address (readiness only).")
