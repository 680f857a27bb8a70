"""alignjax.data: record schemas, tokenizers and chat templates, grain pipelines, synthetic tasks."""

from alignjax.data.preference import (
    PreferenceStats,
    default_preference_data_config,
    encode_preference,
    make_preference_dataset,
    make_preference_iterator,
    preference_rows,
)
from alignjax.data.records import (
    PREFERENCE_KINDS,
    ROLES,
    RecordError,
    validate_preference,
    validate_sft,
)
from alignjax.data.sft import (
    Counters,
    SFTStats,
    default_data_config,
    make_sft_dataset,
    make_sft_iterator,
    open_records,
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
    PreferenceSource,
    arithmetic_eval_examples,
    preference_eval_examples,
    synthetic_source,
    true_score,
)
from alignjax.data.tokenizer import CharTokenizer, Tokenizer, compile_chat_template
