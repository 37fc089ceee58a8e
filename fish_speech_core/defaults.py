"""Defaults shared by the stages and every layer above them, each defined once here.

The CLI, the flow's form, the per-stage parameter models and the core's settings dataclasses all
read these names, so a default cannot drift between layers.
"""

MAX_SECONDS = 30.0  # clips longer than this are rejected (the recipe's limit)
TEXT_EXTENSION = ".lab"  # transcript beside each audio file
PEAK_DBFS = -1.0  # normalize: peak target before the loudness gain, and the clipping ceiling
LOUDNESS_LUFS = -23.0  # normalize: integrated loudness (EBU R128)
SHARD_SIZE_MB = 10.0  # pack: target .protos shard size
MAX_STEPS = 1000  # training steps of the recipe
SEED = 42  # training sample stream, adapter init, previews
LORA_PRESET = "r_8_alpha_16"  # the recipe's adapter: rank 8, alpha 16 (scaling 2), dropout 0.01
LORA_R = 8
LORA_ALPHA = 16.0
LORA_DROPOUT = 0.01
BATCH_SIZE = 8  # training samples per micro-batch, summed over every process (the recipe's, on one GPU)
LR = 1e-4  # AdamW, constant after the warmup
VAL_CHECK_INTERVAL = 100  # validate (and checkpoint) every N steps
VAL_FRACTION = 0.05  # share of sentences held out for validation
SAVE_TOP_K = 5  # checkpoints kept per run
# distributed training: how long a rank waits for the others (joining, or in a collective) before
# it fails; a rank that dies mid-run is noticed at once on gloo (its connection closes)
DIST_TIMEOUT_S = 600
# extract: padded audio seconds per batch on CPU, where big batches run slower per second of audio
# (bench/extract.py: CPU encoding slows past ~1 min per batch); no cap on CUDA
CPU_BATCH_SECONDS = 60.0
# validate and normalize on the cpu pool (cpu_pool set, data_shards empty): one shard per this many
# clips (found ones for validate, accepted ones for normalize), at most DATA_MAX_SHARDS. A shard's
# child run costs ~10-15 s of start-up (a Python process importing the stack) while normalizing
# (or validating) 2000 clips of ~10 s takes minutes on one core, so smaller data stays one run
# (1 shard up to 2000 clips, 2 up to 4000, ...)
DATA_ITEMS_PER_SHARD = 2000
DATA_MAX_SHARDS = 16
# extract: decode worker processes; 0 = the extracting process decodes (in line on CPU, a thread
# ahead of a GPU encoder). On 2 quiet cores it beat one worker process in every same-run pair.
EXTRACT_DECODE_WORKERS = 0
