"""The chat stage (MiniChat): instruction tuning, optionally with KD, in the distillation job itself.

    python tools/prepare_chat.py --input chats.jsonl --tokenizer STUDENT_DIR --out DATA_DIR --seq-len 4096
    deepspeed --num_gpus 8 -m minima.sft minichat_3b student.path=STUDENT_DIR data.dir=DATA_DIR
    python -m minima.sft tiny_chat                      # the demo's miniature, on CPU

The same entry point as ``minima.distill``, over the same step, checkpoints, resume, logging and export: what makes
it the chat stage is its data (conversations whose shards flag the assistant replies as the only labelled positions,
packed with restarting position ids) and its recipe (``minichat_3b``: lr 2e-5, 3 epochs, early stopping on the dev
loss, the best evaluation exported with its chat template).
"""

import sys

from minima.distill import main

if __name__ == "__main__":
    sys.exit(main())
