from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_FLOAT16: _ClassVar[DType]
    DTYPE_BFLOAT16: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]

class CloseReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CLOSE_REASON_UNSPECIFIED: _ClassVar[CloseReason]
    CLOSE_REASON_FINISHED: _ClassVar[CloseReason]
    CLOSE_REASON_CANCELLED: _ClassVar[CloseReason]
    CLOSE_REASON_ERROR: _ClassVar[CloseReason]
DTYPE_UNSPECIFIED: DType
DTYPE_FLOAT16: DType
DTYPE_BFLOAT16: DType
DTYPE_FLOAT32: DType
CLOSE_REASON_UNSPECIFIED: CloseReason
CLOSE_REASON_FINISHED: CloseReason
CLOSE_REASON_CANCELLED: CloseReason
CLOSE_REASON_ERROR: CloseReason

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class DrafterOptions(_message.Message):
    __slots__ = ("kind", "block_len", "temperature", "proposal_top_k", "seed", "extra", "grammar_kind", "grammar_source")
    class ExtraEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    KIND_FIELD_NUMBER: _ClassVar[int]
    BLOCK_LEN_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    PROPOSAL_TOP_K_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    EXTRA_FIELD_NUMBER: _ClassVar[int]
    GRAMMAR_KIND_FIELD_NUMBER: _ClassVar[int]
    GRAMMAR_SOURCE_FIELD_NUMBER: _ClassVar[int]
    kind: str
    block_len: int
    temperature: float
    proposal_top_k: int
    seed: int
    extra: _containers.ScalarMap[str, str]
    grammar_kind: str
    grammar_source: str
    def __init__(self, kind: _Optional[str] = ..., block_len: _Optional[int] = ..., temperature: _Optional[float] = ..., proposal_top_k: _Optional[int] = ..., seed: _Optional[int] = ..., extra: _Optional[_Mapping[str, str]] = ..., grammar_kind: _Optional[str] = ..., grammar_source: _Optional[str] = ...) -> None: ...

class Open(_message.Message):
    __slots__ = ("request_id", "prompt_token_ids", "options", "prompt_len")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LEN_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    options: DrafterOptions
    prompt_len: int
    def __init__(self, request_id: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., options: _Optional[_Union[DrafterOptions, _Mapping]] = ..., prompt_len: _Optional[int] = ...) -> None: ...

class Step(_message.Message):
    __slots__ = ("request_id", "step_id", "new_token_ids", "features", "context_len", "anchor_token_id", "block_len", "num_verified")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    NEW_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_LEN_FIELD_NUMBER: _ClassVar[int]
    ANCHOR_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    BLOCK_LEN_FIELD_NUMBER: _ClassVar[int]
    NUM_VERIFIED_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    step_id: int
    new_token_ids: _containers.RepeatedScalarFieldContainer[int]
    features: Tensor
    context_len: int
    anchor_token_id: int
    block_len: int
    num_verified: int
    def __init__(self, request_id: _Optional[str] = ..., step_id: _Optional[int] = ..., new_token_ids: _Optional[_Iterable[int]] = ..., features: _Optional[_Union[Tensor, _Mapping]] = ..., context_len: _Optional[int] = ..., anchor_token_id: _Optional[int] = ..., block_len: _Optional[int] = ..., num_verified: _Optional[int] = ...) -> None: ...

class Close(_message.Message):
    __slots__ = ("request_id", "reason")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    reason: CloseReason
    def __init__(self, request_id: _Optional[str] = ..., reason: _Optional[_Union[CloseReason, str]] = ...) -> None: ...

class Steps(_message.Message):
    __slots__ = ("steps",)
    STEPS_FIELD_NUMBER: _ClassVar[int]
    steps: _containers.RepeatedCompositeFieldContainer[Step]
    def __init__(self, steps: _Optional[_Iterable[_Union[Step, _Mapping]]] = ...) -> None: ...

class DraftRequest(_message.Message):
    __slots__ = ("open", "step", "close", "steps")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    CLOSE_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    open: Open
    step: Step
    close: Close
    steps: Steps
    def __init__(self, open: _Optional[_Union[Open, _Mapping]] = ..., step: _Optional[_Union[Step, _Mapping]] = ..., close: _Optional[_Union[Close, _Mapping]] = ..., steps: _Optional[_Union[Steps, _Mapping]] = ...) -> None: ...

class DraftBlock(_message.Message):
    __slots__ = ("request_id", "step_id", "draft_token_ids", "proposal_k", "proposal_token_ids", "proposal_probs", "confidences", "draft_time_us")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    DRAFT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    PROPOSAL_K_FIELD_NUMBER: _ClassVar[int]
    PROPOSAL_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    PROPOSAL_PROBS_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCES_FIELD_NUMBER: _ClassVar[int]
    DRAFT_TIME_US_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    step_id: int
    draft_token_ids: _containers.RepeatedScalarFieldContainer[int]
    proposal_k: int
    proposal_token_ids: _containers.RepeatedScalarFieldContainer[int]
    proposal_probs: _containers.RepeatedScalarFieldContainer[float]
    confidences: _containers.RepeatedScalarFieldContainer[float]
    draft_time_us: int
    def __init__(self, request_id: _Optional[str] = ..., step_id: _Optional[int] = ..., draft_token_ids: _Optional[_Iterable[int]] = ..., proposal_k: _Optional[int] = ..., proposal_token_ids: _Optional[_Iterable[int]] = ..., proposal_probs: _Optional[_Iterable[float]] = ..., confidences: _Optional[_Iterable[float]] = ..., draft_time_us: _Optional[int] = ...) -> None: ...

class DraftError(_message.Message):
    __slots__ = ("request_id", "step_id", "message")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    step_id: int
    message: str
    def __init__(self, request_id: _Optional[str] = ..., step_id: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class DraftResponse(_message.Message):
    __slots__ = ("block", "error")
    BLOCK_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    block: DraftBlock
    error: DraftError
    def __init__(self, block: _Optional[_Union[DraftBlock, _Mapping]] = ..., error: _Optional[_Union[DraftError, _Mapping]] = ...) -> None: ...
