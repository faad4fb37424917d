"""Every column name, field order and dtype of raytopk's data, defined once.

Two layouts:
- the raw RecFlow layout (docs/protocol.md §4.1) that users download and the synthetic generator
  writes;
- the converted parquet dataset that training reads (one row per request, fixed-size list
  columns), written by ``raytopk.data.convert``.

Stored ids in the converted dataset are raw id + 1, with 0 reserved for padding (every field,
category_level_one included). Every embedding table therefore needs vocab[field] rows, where
vocab[field] = id_cnt[field] + 2 for RecFlow's id fields (docs/protocol.md §4.1) and the fixed sizes
below for the time fields.
"""

from __future__ import annotations

SCHEMA_VERSION = 1
FIRST_DAY = "2024-01-13"
TIME_ZONE = "Asia/Shanghai"

SEQ_LEN = 50  # behaviour sequence length
GROUP_SIZE = 10  # slots per candidate group
CAND_GROUPS = ("rank_pos", "rank_neg", "coarse_neg", "prerank_neg")  # slot order in a row
N_OWN = GROUP_SIZE * len(CAND_GROUPS)  # 40 own candidate slots per request
K_TRUTH = 10  # |G|: the ground-truth top set
EVAL_SAMPLE_NUM = 160  # negatives per request at evaluation, docs/protocol.md §4.5
N_EVAL = N_OWN + EVAL_SAMPLE_NUM  # candidates per request at evaluation: 200

# docs/protocol.md §4.3: priority of each slot kind (rank_pos slots: 30 - rank_index).
RANK_POS_BASE = 30
GROUP_PRIORITY = {"rank_neg": 7.0, "coarse_neg": 6.0, "prerank_neg": 5.0}
SAMPLED_PRIORITY = 0.0

# ---- raw RecFlow layout --------------------------------------------------------------------
RAW_STAGES = (
    "realshow",
    "rerank_pos",
    "rerank_neg",
    "rank_pos",
    "rank_neg",
    "coarse_neg",
    "prerank_neg",
)
ALL_STAGE_COLUMNS = (
    "request_id",
    "request_timestamp",
    "user_id",
    "device_id",
    "age",
    "gender",
    "province",
    "video_id",
    "author_id",
    "category_level_one",
    "category_level_two",
    "upload_type",
    "upload_timestamp",
    "duration",
    "realshow",
    "rerank_pos",
    "rerank_neg",
    "rank_pos",
    "rank_neg",
    "coarse_neg",
    "prerank_neg",
    "rank_index",
    "rerank_index",
    "playing_time",
    "effective_view",
    "long_view",
    "like",
    "follow",
    "forward",
    "comment",
)
# seq_effective_50_dict/DAY.pkl: request_id -> int array (50, 10) in this column order.
RAW_SEQ_FIELDS = (
    "video_id",
    "author_id",
    "category_level_two",
    "category_level_one",
    "upload_type",
    "upload_time",
    "duration_ms",
    "time_ms",
    "playing_time",
    "request_id",
)
# request_id_dict/DAY.pkl: request_id -> stage -> int array (n_items, 8) in this column order.
RAW_STAGE_ITEM_FIELDS = (
    "video_id",
    "author_id",
    "duration_ms",
    "category_level_two",
    "upload_type",
    "upload_timestamp",
    "category_level_one",
    "effective_view",
)
# others/id_cnt.pkl keys as the real release spells them (note 'photo_id' and the leading space).
RAW_ID_CNT_KEYS = {
    "user_id": "user_id",
    "device_id": "device_id",
    "age": "age",
    "gender": "gender",
    "province": "province",
    "video_id": "photo_id",
    "author_id": "author_id",
    "category_level_one": "category_level_one",
    "category_level_two": " category_level_two",
    "upload_type": "upload_type",
}

# ---- converted dataset -------------------------------------------------------------------
CONTEXT_FIELDS = ("weekday", "hour", "minute")  # of request_timestamp, Asia/Shanghai
USER_FIELDS = ("user_id", "device_id", "gender", "age", "province")
SEQ_FIELDS = ("video_id", "author_id", "category_level_two", "category_level_one", "upload_type")
# Item features of a candidate, in CascadeBatch.items' last-dim order.
ITEM_FIELDS = (
    "video_id",
    "author_id",
    "category_level_two",
    "category_level_one",
    "upload_type",
    "upload_weekday",
    "upload_hour",
    "upload_minute",
)
TIME_VOCAB = {
    "weekday": 7 + 2,
    "hour": 24 + 2,
    "minute": 60 + 2,
    "upload_weekday": 7 + 2,
    "upload_hour": 24 + 2,
    "upload_minute": 60 + 2,
}
# Which embedding table each feature uses (upload time shares the request-time tables).
EMBEDDING_TABLE = {
    **{f: f for f in USER_FIELDS + SEQ_FIELDS + CONTEXT_FIELDS},
    "upload_weekday": "weekday",
    "upload_hour": "hour",
    "upload_minute": "minute",
}

REQUEST_ID = "request_id"
SEQ_MASK = "seq_mask"
CAND_MASK = "cand_mask"
CAND_PRIORITY = "cand_priority"


def seq_col(field: str) -> str:
    return f"seq_{field}"


def cand_col(field: str) -> str:
    return f"cand_{field}"


# Columns of OUT/requests/day=YYYY-MM-DD/*.parquet, one row per request. seq_* are fixed-size
# lists of SEQ_LEN, cand_* fixed-size lists of N_OWN (40 + sample_num after sampling).
REQUEST_COLUMNS = (
    REQUEST_ID,
    *CONTEXT_FIELDS,
    *USER_FIELDS,
    *(seq_col(f) for f in SEQ_FIELDS),
    SEQ_MASK,
    *(cand_col(f) for f in ITEM_FIELDS),
    CAND_MASK,
    CAND_PRIORITY,
)
CAND_COLUMNS = (*(cand_col(f) for f in ITEM_FIELDS), CAND_MASK, CAND_PRIORITY)
# OUT/items.parquet: the item corpus, one row per video_id (stored ids, +1 shifted).
ITEM_TABLE_COLUMNS = ITEM_FIELDS
