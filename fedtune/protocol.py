"""Record and metric keys shared by the client and the server, in one place.

A train reply from a client is a RecordDict with:

- ``ARRAYS``: ArrayRecord of exactly the parameters the client updated, keyed by
  parameter name (the names of the global model's state dict);
- ``METRICS``: MetricRecord of scalars, at least ``NUM_EXAMPLES`` (> 0); may carry
  ``IMPORTANCE``, a list of per-block importance floats;
- ``UPDATE_COUNTS`` (optional): MetricRecord, parameter name -> number of local
  optimizer steps that updated that parameter.

This module imports no Flower.
"""

# Record keys in a Message's RecordDict.
ARRAYS = "arrays"  # ArrayRecord: parameter name -> Array
CONFIG = "config"  # ConfigRecord sent with every instruction
METRICS = "metrics"  # MetricRecord of scalars (and a few lists)
UPDATE_COUNTS = "update-counts"  # MetricRecord: parameter name -> int steps
HEAD_STATS = "head-stats"  # ArrayRecord in an evaluate reply: per task "<task>.count" [C], "<task>.sum" [C, d], "<task>.outer" [d, d]

# Metric keys in the METRICS record of a reply.
NUM_EXAMPLES = "num-examples"  # int > 0, weight of the reply
IMPORTANCE = "importance"  # list[float], one per block; also the config key sent back

# Config keys in the CONFIG record of an instruction.
SERVER_ROUND = "server-round"  # set by Flower's FedAvg.configure_train
WANT_HEAD_STATS = "want-head-stats"  # in an evaluate instruction: reply with HEAD_STATS too

# How the server weights each sender of a parameter (federation.weighting).
WEIGHTINGS = ("examples", "updates")  # by the reply's NUM_EXAMPLES | by its UPDATE_COUNTS for that parameter

# Metric keys the server adds to each round's aggregated train MetricRecord.
REPLIES_ACCEPTED = "replies-accepted"  # replies that entered the aggregate
REPLIES_REJECTED = "replies-rejected"  # error replies and replies failing validation
BYTES_UP = "bytes-up"  # raw tensor bytes received in accepted replies
