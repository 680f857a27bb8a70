"""alignjax.data: record schemas, tokenizers and chat templates, grain pipelines, synthetic tasks."""

from alignjax.data.records import ROLES, RecordError, validate_sft
from alignjax.data.sft import (
    SFTStats,
    default_data_config,
    make_sft_dataset,
    make_sft_iterator,
    open_sft_source,
    tokenize_sft,
)
from alignjax.data.sources import (
    ArrayRecordSource,
    ConcatSource,
    JsonlSource,
    ParquetSource,
    expand_paths,
    open_source,
)
from alignjax.data.synthetic import (
    SYNTHETIC_TASKS,
    ArithmeticSource,
    arithmetic_eval_examples,
    synthetic_source,
)
from alignjax.data.tokenizer import CharTokenizer, Tokenizer, compile_chat_template
