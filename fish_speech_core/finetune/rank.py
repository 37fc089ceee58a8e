"""One rank of a training run, started by its node's local rank 0 (:mod:`.distributed`).

    python -m fish_speech_core.finetune.rank CONFIG_JSON RESUME    # LOCAL_RANK etc. in the environment

RESUME is local rank 0's decision (a checkpoint path, or ``never``), so every rank resumes the
same step. Rank 0 reports progress and writes the run's files; this process only trains.
"""

from __future__ import annotations

import json
import sys


def main(argv: list[str] | None = None) -> int:
    from fish_speech_core.finetune.limits import TrainError
    from fish_speech_core.finetune.module import TrainConfig
    from fish_speech_core.finetune.train import train

    config_json, resume = argv if argv is not None else sys.argv[1:]
    try:
        train(TrainConfig.from_dict(json.loads(config_json)), resume=resume, show_progress=False)
    except TrainError as err:
        print(f"Error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
