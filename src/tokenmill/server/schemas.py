"""Request and response schemas of the HTTP API (pydantic v2; they drive /openapi.json).

Two families:

* TGI (``/``, ``/generate``, ``/generate_stream``, ``/tokenize``, ``/info``, ``/vertex``): field
  names, types and defaults of text-generation-inference's router.
* OpenAI (``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``), plus the extensions
  vLLM and TGI accept (``top_k``, ``min_p``, ``repetition_penalty``, ``ignore_eos``,
  ``chat_template_kwargs``).

Parsing policy (all request models):

* **strict types**, as TGI's serde does: ``"3"`` or ``3.0`` for an integer, ``1`` for a boolean,
  ``5`` for a string are rejected (422). Integers are accepted for floats.
* ``NaN`` / ``Infinity`` are rejected (``allow_inf_nan=False``); Python's ``json`` module accepts
  these literals, pydantic does not let them through.
* unknown fields are ignored (TGI and vLLM do the same).
* ``null`` is accepted wherever a field has a default and means "the default".
* **ranges are not checked here** but in :mod:`tokenmill.server.validation`, so that every
  out-of-range value gets TGI's exact ``Input validation error: ...`` message. Integers are
  unbounded at parse time (``2**64`` parses and is then refused with a clean 422).

Response models document the bodies that :mod:`tokenmill.server.responses` builds as plain
dicts (the builders do not instantiate them, for speed; the tests check the dicts against them).
"""

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "BestOfSequence",
    "ChatCompletion",
    "ChatCompletionChoice",
    "ChatCompletionChunk",
    "ChatCompletionChunkChoice",
    "ChatCompletionDelta",
    "ChatCompletionLogprob",
    "ChatCompletionLogprobs",
    "ChatCompletionMessage",
    "ChatCompletionRequest",
    "ChatMessage",
    "ChatTokenizeResponse",
    "CompatGenerateRequest",
    "Completion",
    "CompletionChoice",
    "CompletionLogprobs",
    "CompletionRequest",
    "ContentPart",
    "Details",
    "ErrorResponse",
    "GenerateParameters",
    "GenerateRequest",
    "GenerateResponse",
    "ImageUrl",
    "ImageUrlContentPart",
    "Info",
    "ModelCard",
    "ModelList",
    "OpenAIError",
    "OpenAIErrorResponse",
    "PrefillToken",
    "SimpleToken",
    "StreamDetails",
    "StreamOptions",
    "StreamResponse",
    "TextContentPart",
    "Token",
    "TopLogprob",
    "Usage",
    "VertexInstance",
    "VertexRequest",
    "VertexResponse",
]

_REQUEST = ConfigDict(allow_inf_nan=False, strict=True, extra="ignore")
_RESPONSE = ConfigDict(extra="allow")

TgiFinishReason = Literal["length", "eos_token", "stop_sequence"]
OpenAIFinishReason = Literal["stop", "length", "tool_calls", "content_filter", "function_call"]


# ============================================================================ TGI requests


class GenerateParameters(BaseModel):
    """TGI's `parameters` object. Ranges are checked by `validate_generate` (422 with TGI's
    messages); see the field descriptions."""

    model_config = ConfigDict(
        **_REQUEST,
        json_schema_extra={
            "examples": [
                {
                    "max_new_tokens": 20,
                    "do_sample": True,
                    "temperature": 0.7,
                    "top_p": 0.95,
                    "stop": ["\n\n"],
                    "details": True,
                    "seed": 42,
                }
            ]
        },
    )

    adapter_id: str | None = Field(
        default=None, description="LoRA adapter to use; unknown adapters are refused with a 422.",
        examples=[None],
    )
    best_of: int | None = Field(
        default=None, description="Generate best_of sequences and return the one with the highest "
        "mean token logprob. 1 <= best_of <= max_best_of; needs sampling and no seed.",
        examples=[1],
    )
    decoder_input_details: bool | None = Field(
        default=False, description="Return the prompt tokens (`details.prefill`) with their logprobs. "
        "Not allowed when streaming.",
    )
    details: bool | None = Field(default=False, description="Return generation details.")
    do_sample: bool | None = Field(
        default=False, description="Sample instead of greedy decoding. Also switched on by setting "
        "temperature, top_k, top_p or typical_p. When `parameters` is absent, sampling is on.",
    )
    frequency_penalty: float | None = Field(
        default=None, description="OpenAI-style frequency penalty, in [-2, 2].", examples=[0.1]
    )
    grammar: dict[str, Any] | None = Field(
        default=None, description="Constrained decoding: {type: json, value: <JSON Schema "
        "object or its JSON text>}, {type: json_object} (any JSON object; with a value, an "
        "alias of json), {type: json_schema, value: {name, schema}}, {type: regex, value: "
        "<regex the whole output matches>} or {type: lark, value: <llguidance Lark grammar>}. "
        "Compiled before queuing: an invalid one (or one over 64 KiB) is a 422 with the "
        "compiler's message. JSON is compact (no whitespace); the answer ends (eos_token) "
        "when the grammar is complete.",
        examples=[{"type": "json", "value": {"type": "object", "properties": {
            "name": {"type": "string"}}, "required": ["name"]}}],
    )
    max_new_tokens: int | None = Field(
        default=None, description="Maximum number of generated tokens (> 0). Default: the room left "
        "in max_total_tokens.", examples=[20],
    )
    repetition_penalty: float | None = Field(
        default=None, description="HF repetition penalty (> 0; 1.0 = off).", examples=[1.03]
    )
    return_full_text: bool | None = Field(
        default=None, description="Prepend the inputs to generated_text. Default false (true on `/`).",
        examples=[False],
    )
    seed: int | None = Field(
        default=None, description="Random seed, 0 <= seed < 2**64; drawn at random when absent.",
        examples=[None],
    )
    stop: list[str] | None = Field(
        default_factory=list, description="Stop sequences (at most max_stop_sequences). The "
        "matched stop sequence is part of generated_text, as in TGI.", examples=[["photographer"]],
    )
    temperature: float | None = Field(default=None, description="> 0.", examples=[0.5])
    top_k: int | None = Field(default=None, description="> 0.", examples=[10])
    top_n_tokens: int | None = Field(
        default=None, description="Return the top-n alternatives of each generated token "
        "(0 <= n <= max_top_n_tokens).", examples=[5],
    )
    top_p: float | None = Field(default=None, description="In the open interval (0, 1).", examples=[0.95])
    truncate: int | None = Field(
        default=None, description="Keep only the last `truncate` input tokens "
        "(0 < truncate <= max_input_tokens).", examples=[None],
    )
    typical_p: float | None = Field(
        default=None, description="Typical decoding mass, in the open interval (0, 1).", examples=[0.95]
    )
    watermark: bool | None = Field(
        default=False,
        description="Kirchenbauer watermarking (green-list bias with the server's "
        "--watermark-gamma / --watermark-delta); `tokenmill watermark detect` checks a text.",
    )


class GenerateRequest(BaseModel):
    model_config = ConfigDict(
        **_REQUEST,
        json_schema_extra={
            "examples": [
                {"inputs": "My name is Olivier and I", "parameters": {"max_new_tokens": 20}}
            ]
        },
    )

    inputs: str = Field(..., examples=["My name is Olivier and I"])
    parameters: GenerateParameters | None = Field(
        default=None, description="Absent: TGI's defaults with do_sample=true."
    )
    stream: bool | None = Field(default=False, description="Ignored on /generate; honoured on `/`.")


class CompatGenerateRequest(GenerateRequest):
    """Body of ``POST /``: a GenerateRequest whose `stream` picks JSON or SSE."""


class VertexInstance(BaseModel):
    model_config = _REQUEST

    inputs: str
    parameters: GenerateParameters | None = None


class VertexRequest(BaseModel):
    model_config = _REQUEST

    instances: list[VertexInstance]


# ============================================================================ TGI responses


class Token(BaseModel):
    model_config = _RESPONSE

    id: int = Field(..., examples=[0])
    text: str = Field(..., examples=["test"])
    logprob: float | None = Field(default=None, examples=[-0.34])
    special: bool = Field(..., examples=[False])


class PrefillToken(BaseModel):
    model_config = _RESPONSE

    id: int = Field(..., examples=[0])
    text: str = Field(..., examples=["test"])
    logprob: float | None = Field(default=None, description="null for the first token", examples=[-0.34])


class BestOfSequence(BaseModel):
    model_config = _RESPONSE

    generated_text: str
    finish_reason: TgiFinishReason
    generated_tokens: int
    seed: int | None = None
    prefill: list[PrefillToken]
    tokens: list[Token]
    top_tokens: list[list[Token]] | None = None


class Details(BaseModel):
    model_config = _RESPONSE

    finish_reason: TgiFinishReason
    generated_tokens: int
    seed: int | None = Field(default=None, description="The seed used; null for greedy decoding.")
    prefill: list[PrefillToken]
    tokens: list[Token]
    top_tokens: list[list[Token]] | None = Field(default=None, description="Omitted when empty.")
    best_of_sequences: list[BestOfSequence] | None = Field(
        default=None, description="Present only when best_of > 1."
    )


class GenerateResponse(BaseModel):
    model_config = _RESPONSE

    generated_text: str = Field(..., examples=["test"])
    details: Details | None = None


class StreamDetails(BaseModel):
    model_config = _RESPONSE

    finish_reason: TgiFinishReason
    generated_tokens: int
    seed: int | None = None
    input_length: int


class StreamResponse(BaseModel):
    model_config = _RESPONSE

    index: int
    token: Token
    top_tokens: list[Token] | None = Field(default=None, description="Omitted when empty.")
    generated_text: str | None = Field(default=None, description="The full text, on the last event.")
    details: StreamDetails | None = Field(default=None, description="On the last event, if asked for.")


class Info(BaseModel):
    model_config = _RESPONSE

    model_id: str
    model_sha: str | None = None
    model_pipeline_tag: str | None = None
    max_concurrent_requests: int
    max_best_of: int
    max_stop_sequences: int
    max_input_tokens: int
    max_total_tokens: int
    validation_workers: int
    max_client_batch_size: int
    router: str
    version: str
    sha: str | None = None
    docker_label: str | None = None


class SimpleToken(BaseModel):
    model_config = _RESPONSE

    id: int
    text: str
    start: int
    stop: int


class ChatTokenizeResponse(BaseModel):
    model_config = _RESPONSE

    tokenize_response: list[SimpleToken]
    templated_text: str


class VertexResponse(BaseModel):
    model_config = _RESPONSE

    predictions: list[str]


class ErrorResponse(BaseModel):
    """TGI's error body (also the top level of the /v1 error body, see `OpenAIErrorResponse`)."""

    model_config = _RESPONSE

    error: str = Field(..., examples=["Input validation error: `inputs` cannot be empty"])
    error_type: str = Field(..., examples=["validation"])


class OpenAIError(BaseModel):
    model_config = _RESPONSE

    message: str
    type: str
    param: str | None = None
    code: int | str | None = None


class OpenAIErrorResponse(BaseModel):
    """Error body on /v1 routes: OpenAI's envelope, which the openai client reads
    (``body["error"]["message"]``), plus TGI's `error_type` at the top level."""

    model_config = _RESPONSE

    error: OpenAIError
    error_type: str


# ============================================================================ OpenAI requests


class TextContentPart(BaseModel):
    model_config = _REQUEST

    type: Literal["text"]
    text: str


class ImageUrl(BaseModel):
    model_config = _REQUEST

    url: str
    detail: str | None = None


class ImageUrlContentPart(BaseModel):
    """Parsed so that a text-only model can answer with a clear 422."""

    model_config = _REQUEST

    type: Literal["image_url"]
    image_url: ImageUrl


ContentPart = Annotated[TextContentPart | ImageUrlContentPart, Field(discriminator="type")]


class ChatMessage(BaseModel):
    model_config = _REQUEST

    role: str = Field(..., description="system, developer (= system), user, assistant or tool",
                      examples=["user"])
    content: str | list[ContentPart] | None = Field(
        default=None, description="A string or a list of text parts.", examples=["What is Deep Learning?"]
    )
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class StreamOptions(BaseModel):
    model_config = _REQUEST

    include_usage: bool | None = False


StopField = str | list[str] | None


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(
        **_REQUEST,
        json_schema_extra={
            "examples": [
                {
                    "model": "tgi",
                    "messages": [
                        {"role": "system", "content": "You are a helpful assistant."},
                        {"role": "user", "content": "What is Deep Learning?"},
                    ],
                    "max_tokens": 32,
                    "stream": False,
                }
            ]
        },
    )

    model: str | None = Field(default=None, examples=["tgi"])
    messages: list[ChatMessage]
    frequency_penalty: float | None = Field(default=None, description="In [-2, 2].")
    presence_penalty: float | None = Field(default=None, description="In [-2, 2].")
    repetition_penalty: float | None = Field(default=None, description="Extension: HF penalty, > 0.")
    logit_bias: dict[str, float] | None = Field(
        default=None, description="Token id -> bias in [-100, 100]. Not supported yet (422 if non-empty)."
    )
    logprobs: bool | None = False
    top_logprobs: int | None = Field(default=None, description="0..max_top_logprobs; needs logprobs.")
    max_tokens: int | None = Field(default=None, description="Deprecated alias of max_completion_tokens.")
    max_completion_tokens: int | None = None
    n: int | None = Field(default=1, description="Number of choices, 1..max_n.")
    stop: StopField = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(default=None, description="0 <= seed < 2**64.")
    temperature: float | None = Field(default=None, description=">= 0; 0 = greedy. Default 1.")
    top_p: float | None = Field(default=None, description="In (0, 1].")
    top_k: int | None = Field(default=None, description="Extension: -1 or 0 = off.")
    min_p: float | None = Field(default=None, description="Extension: in [0, 1].")
    tools: list[dict[str, Any]] | None = Field(
        default=None, description="OpenAI function tools, {type: function, function: {name, "
        "description, parameters (JSON Schema), strict}}; at most 128, unique names. The answer "
        "is constrained to a valid call (arguments validated against `parameters`).",
    )
    tool_choice: str | dict[str, Any] | None = Field(
        default=None, description="auto (default with tools: a call or text), none, required, "
        "{type: function, function: {name}} or (TGI) a bare function name.",
    )
    parallel_tool_calls: bool | None = Field(
        default=None, description="Default true: `required` may answer with up to 8 calls.",
    )
    tool_prompt: str | None = Field(
        default=None, description="TGI extension: the instruction shown with the tools when the "
        "chat template does not render them.",
    )
    response_format: dict[str, Any] | None = Field(
        default=None, description="{type: text} (default), {type: json_object}, or {type: "
        "json_schema, json_schema: {name, schema, strict}} (the schema is always enforced). "
        "TGI's {type: json|regex|lark|json_schema, value} form is accepted too. An invalid "
        "schema or grammar is a 422 with the compiler's message.",
    )
    chat_template_kwargs: dict[str, Any] | None = Field(
        default=None, description="Extra template variables; only an allow-list of keys is accepted."
    )
    ignore_eos: bool | None = Field(default=False, description="Extension: keep going after EOS.")
    user: str | None = None


class CompletionRequest(BaseModel):
    model_config = ConfigDict(
        **_REQUEST,
        json_schema_extra={
            "examples": [{"model": "tgi", "prompt": "Say this is a test", "max_tokens": 16}]
        },
    )

    model: str | None = Field(default=None, examples=["tgi"])
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        ..., description="A string, strings, token ids, or lists of token ids."
    )
    suffix: str | None = Field(default=None, description="Not supported (422).")
    max_tokens: int | None = 16
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    n: int | None = 1
    best_of: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    logprobs: int | None = Field(default=None, description="Number of top alternatives to return.")
    echo: bool | None = False
    stop: StopField = None
    seed: int | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    ignore_eos: bool | None = False
    response_format: dict[str, Any] | None = Field(
        default=None, description="Extension (as vLLM): {type: text | json_object | "
        "json_schema, json_schema: {name, schema}}, or TGI's {type, value} grammar form.",
    )
    user: str | None = None


# ============================================================================ OpenAI responses


class Usage(BaseModel):
    model_config = _RESPONSE

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(BaseModel):
    model_config = _RESPONSE

    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatCompletionLogprob(BaseModel):
    model_config = _RESPONSE

    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob]


class ChatCompletionLogprobs(BaseModel):
    model_config = _RESPONSE

    content: list[ChatCompletionLogprob] | None = None


class ChatCompletionMessage(BaseModel):
    model_config = _RESPONSE

    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


class ChatCompletionChoice(BaseModel):
    model_config = _RESPONSE

    index: int
    message: ChatCompletionMessage
    logprobs: ChatCompletionLogprobs | None = None
    finish_reason: OpenAIFinishReason


class ChatCompletion(BaseModel):
    model_config = _RESPONSE

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatCompletionChoice]
    usage: Usage


class ChatCompletionDelta(BaseModel):
    model_config = _RESPONSE

    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[dict[str, Any]] | None = Field(
        default=None, description="[{index, id, type: function, function: {name, arguments}}]",
    )


class ChatCompletionChunkChoice(BaseModel):
    model_config = _RESPONSE

    index: int
    delta: ChatCompletionDelta
    logprobs: ChatCompletionLogprobs | None = None
    finish_reason: OpenAIFinishReason | None = None


class ChatCompletionChunk(BaseModel):
    model_config = _RESPONSE

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatCompletionChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy logprobs object."""

    model_config = _RESPONSE

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    model_config = _RESPONSE

    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: OpenAIFinishReason | None = None


class Completion(BaseModel):
    """A completion, or (with finish_reason null and usage null) one stream chunk."""

    model_config = _RESPONSE

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    model_config = _RESPONSE

    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str


class ModelList(BaseModel):
    model_config = _RESPONSE

    object: Literal["list"] = "list"
    data: list[ModelCard]
